//! Any bytes as a /proc/net/{tcp,udp}{,6} table: parsing never panics, and
//! every listener it returns came from a line of the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netpulse::{config::Proto, identity::sockets::parse_table};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for proto in [Proto::Tcp, Proto::Udp] {
        let found = parse_table(text, proto, (32768, 60999));
        assert!(found.len() <= text.lines().count());
    }
});
