//! `parse_sweep` on arbitrary sweep-file bytes, then `resolve` of each variant with models.
#![no_main]
use aoe::recipe::RecipeSpec;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(variants) = aoe::mount::fs::parse_sweep(Path::new("s"), data) else {
        return;
    };
    for (_, spec) in variants {
        let models = RecipeSpec {
            base: Some("/m/base".into()),
            parents: Some(vec!["/m/p1".into()]),
            ..RecipeSpec::default()
        };
        let _ = models.merge(spec).resolve();
    }
});
