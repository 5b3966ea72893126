//! `RecipeSpec::from_variant_name` on arbitrary names, then `resolve` with models supplied.
#![no_main]
use aoe::recipe::RecipeSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(name) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(spec) = RecipeSpec::from_variant_name(name) else {
        return;
    };
    let mut models = RecipeSpec {
        base: Some("/m/base".into()),
        parents: Some(vec!["/m/p1".into()]),
        ..RecipeSpec::default()
    };
    if spec.weights.as_ref().is_some_and(|w| w.len() > 2) {
        models.parents = Some(
            (1..spec.weights.as_ref().unwrap().len())
                .map(|i| format!("/m/p{i}").into())
                .collect(),
        );
    }
    let _ = models.merge(spec).resolve();
});
