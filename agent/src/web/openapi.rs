//! The OpenAPI document of the agent's HTTP endpoints, derived from the
//! handlers' `#[utoipa::path]` and the answer types of
//! [`crate::api_types`]; served at `/api/v1/openapi.json`, built once.
//! The test `the_openapi_document_matches_the_routes` holds it to the
//! router in both directions.

use std::sync::OnceLock;

use utoipa::{
    Modify, OpenApi, ToSchema,
    openapi::security::{Http, HttpAuthScheme, SecurityScheme},
};

use super::{api, captures, status};
use crate::api_types as t;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "netpulse agent API",
        version = "1",
        description = "Per-service network counters, health checks and jobs of one netpulse agent. Errors are JSON: {\"error\": \"...\"}. Endpoints that start work need `Authorization: Bearer <api.token>`.",
        license(name = "MIT"),
    ),
    paths(
        status::page,
        metrics,
        healthz,
        probe,
        status::badge,
        status::openapi,
        status::services,
        status::service,
        status::interfaces,
        api::checks,
        api::run_check,
        api::run_tag,
        api::hook,
        api::jobs,
        api::job,
        api::map,
        captures::list,
        captures::start,
        captures::file,
    ),
    components(schemas(t::ErrorBody, t::CaptureOutcome)),
    modifiers(&BearerToken),
)]
pub struct ApiDoc;

/// The `bearer` scheme the endpoints that start work name.
struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// A pcapng file, as the schema of a download.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub(crate) struct Pcapng(Vec<u8>);

/// The document, serialized once.
pub fn json() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc = match serde_json::to_value(ApiDoc::openapi()) {
            Ok(d) => d,
            Err(e) => return format!("{{\"error\": \"building the document: {e}\"}}"),
        };
        every_field_required(&mut doc);
        serde_json::to_string(&doc).unwrap_or_default()
    })
}

/// The answers carry every field, `null` where there is no value: each
/// answer schema requires all its properties. (The types read with
/// `#[serde(default)]` so that the CLI takes a partial answer; that
/// leniency is the reader's, not the contract, so the defaults go too.)
/// The requests' schemas keep their optional fields.
fn every_field_required(doc: &mut serde_json::Value) {
    const REQUESTS: &[&str] = &["CaptureRequest"];
    // Fields that only some answers carry (`skip_serializing_if`).
    const SOMETIMES: &[(&str, &str)] = &[
        ("CapturePlan", "check"),
        ("CapturePlan", "trigger"),
        ("CaptureOutcome", "dropped"),
        ("CaptureOutcome", "packets_before_trigger"),
        ("CaptureOutcome", "check"),
    ];
    let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(|s| s.as_object_mut())
    else {
        return;
    };
    for (name, schema) in schemas.iter_mut() {
        if REQUESTS.contains(&name.as_str()) {
            continue;
        }
        let Some(obj) = schema.as_object_mut() else {
            continue;
        };
        let Some(props) = obj.get_mut("properties").and_then(|p| p.as_object_mut()) else {
            continue;
        };
        for p in props.values_mut() {
            if let Some(p) = p.as_object_mut() {
                p.remove("default");
            }
        }
        let required: Vec<serde_json::Value> = props
            .keys()
            .filter(|p| !SOMETIMES.contains(&(name.as_str(), p.as_str())))
            .cloned()
            .map(Into::into)
            .collect();
        obj.insert("required".into(), required.into());
    }
}

// The endpoints of `super` (web/mod.rs) outside /api/v1, documented here:
// the attributes describe them; these functions are never called.

/// Prometheus metrics (text exposition format 0.0.4).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "metrics",
    responses((status = 200, description = "Every netpulse_* series.", content_type = "text/plain", body = String))
)]
#[allow(dead_code)]
fn metrics() {}

/// Whether probes are attached.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "metrics",
    responses(
        (status = 200, description = "Probes on at least one interface.", content_type = "text/plain", body = String),
        (status = 503, description = "No interface has probes attached.", content_type = "text/plain", body = String),
    )
)]
#[allow(dead_code)]
fn healthz() {}

/// blackbox_exporter-compatible probe: whoever reaches it can make the
/// agent connect to any target.
#[utoipa::path(
    get,
    path = "/probe",
    tag = "metrics",
    params(
        ("target" = String, Query, description = "What to probe (a URL, host:port or name, by module)."),
        ("module" = Option<String>, Query, description = "A check's name, or `http_2xx` (default), `http_post_2xx`, `tcp_connect`, `icmp`."),
    ),
    responses(
        (status = 200, description = "probe_* metrics.", content_type = "text/plain", body = String),
        (status = 400, description = "Missing target or unknown module.", content_type = "text/plain", body = String),
    )
)]
#[allow(dead_code)]
fn probe() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_builds_and_names_the_bearer_scheme() {
        let doc: serde_json::Value = serde_json::from_str(json()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
        assert!(doc["components"]["schemas"]["Service"].is_object());
        assert!(doc["components"]["schemas"]["Error"].is_object());
        assert!(doc["paths"]["/api/v1/services"]["get"].is_object());
        // Answers carry every field; requests keep their optional ones.
        let service = &doc["components"]["schemas"]["Service"];
        assert_eq!(
            service["required"].as_array().unwrap().len(),
            service["properties"].as_object().unwrap().len()
        );
        assert!(service["properties"]["state"].get("default").is_none());
        assert!(doc["components"]["schemas"]["CaptureRequest"]["required"].is_null());
        let plan = &doc["components"]["schemas"]["CapturePlan"]["required"];
        assert!(plan.as_array().unwrap().iter().all(|p| p != "check"));
    }
}
