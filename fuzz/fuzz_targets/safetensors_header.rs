//! `parse_header` on arbitrary shard bytes: never panics, and what it accepts is consistent.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok((header_len, tensors)) = aoe::model::checkpoint::parse_header(Path::new("f"), data)
    else {
        return;
    };
    // Accepted tensors tile the data region exactly, in order, each of its shape's byte size.
    let mut at = header_len;
    for t in &tensors {
        assert_eq!(
            t.start, at,
            "{} does not start where the previous ended",
            t.name
        );
        let numel: u64 = t.shape.iter().map(|&d| d as u64).product();
        assert_eq!(numel * t.dtype.size() as u64, t.len, "{}", t.name);
        at += t.len;
    }
    assert_eq!(at, data.len() as u64, "the tensors cover the file");
});
