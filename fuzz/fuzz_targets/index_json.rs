//! `parse_index` on arbitrary `model.safetensors.index.json` bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok((names, map)) = aoe::model::checkpoint::parse_index(Path::new("i"), data) else {
        return;
    };
    assert!(!names.is_empty());
    assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
    for shard in map.values() {
        assert!(names.binary_search(shard).is_ok());
        // Shard names are joined to the checkpoint directory: they must stay inside it.
        assert!(!shard.is_empty() && !shard.contains(['/', '\0']));
        assert!(shard != "." && shard != "..");
    }
});
