//! Any bytes as a config file: parsing must return Ok or a located error,
//! never panic, and every error must name a line and column inside the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netpulse::{config::ConfigError, settings::parse};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(ConfigError::Invalid { problems, .. }) = parse(text, std::path::Path::new("f.toml"))
    {
        let lines = text.lines().count().max(1) + 1;
        for p in problems {
            assert!(p.line >= 1 && p.line <= lines, "line {} of {lines}", p.line);
            assert!(p.col >= 1);
        }
    }
});
