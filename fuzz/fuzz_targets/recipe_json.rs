//! `RecipeSpec::from_json` on arbitrary JSON, then `resolve`, alone and with a base and a parent
//! supplied (as `aoe-mount` flags would) so validation goes past the missing models.
#![no_main]
use aoe::recipe::RecipeSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let Ok(spec) = RecipeSpec::from_json(&v) else {
        return;
    };
    let _ = spec.clone().resolve();
    let models = RecipeSpec {
        base: Some("/m/base".into()),
        parents: Some(vec!["/m/p1".into(), "/m/p2".into()]),
        ..RecipeSpec::default()
    };
    let _ = models.clone().merge(spec.clone()).resolve();
    let _ = spec.merge(models).resolve();
});
