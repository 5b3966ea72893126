//! `stats::parse_cache` on arbitrary statistics-cache bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = aoe::recipe::stats::parse_cache(data);
});
