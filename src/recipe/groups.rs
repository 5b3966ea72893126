//! Tensor groups: which part of the model a weight is (routed experts, router, attention, ...).
//! One table of rules, in matching order, for every MoE family aoe knows (docs/semantics.md,
//! "Groups"). A weight belongs to the first group whose pattern matches its name anywhere
//! (Python `re.search` semantics); a companion belongs to its weight's unit.

use std::fmt;
use std::sync::OnceLock;

use regex::RegexSet;

/// A tensor group, in matching order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Group {
    /// Routed experts: per-expert tensors and fused 3-D expert tensors, with their biases.
    Experts,
    /// Shared experts (singular or plural) and the shared-expert gate.
    SharedExperts,
    /// The MoE router: its weight, bias and score-correction bias.
    Router,
    /// Norm weights and biases, q/k norms included.
    Norms,
    /// Attention: projections, their biases, sinks.
    Attention,
    /// Dense MLPs.
    DenseMlp,
    /// Embeddings and output heads.
    Embeddings,
    /// Anything else.
    Other,
}

/// The rules: (group, pattern), first match wins. Names seen in the families each rule is for:
/// - experts: `block_sparse_moe.experts.N.w1.weight` (Mixtral), `mlp.experts.N.gate_proj.weight`
///   (DeepSeek-V3, Kimi-K2, GLM-4.5, Qwen2/3-MoE, OLMoE), `mlp.experts.gate_up_proj`,
///   `mlp.experts.down_proj_bias`, `mlp.experts.gate_up_proj_blocks` (GPT-OSS, fused, MXFP4);
/// - shared-experts: `mlp.shared_experts.up_proj.weight` (DeepSeek, GLM),
///   `mlp.shared_expert.up_proj.weight`, `mlp.shared_expert_gate.weight` (Qwen2-MoE);
/// - router: `mlp.gate.weight`, `mlp.gate.e_score_correction_bias` (DeepSeek, GLM),
///   `block_sparse_moe.gate.weight` (Mixtral), `mlp.router.weight` / `.bias` (GPT-OSS);
/// - norms: `input_layernorm.weight`, `self_attn.q_norm.weight`, `q_a_layernorm.weight`;
/// - attention: `self_attn.q_proj.weight` / `.bias`, `self_attn.sinks` (GPT-OSS);
/// - dense-mlp: `mlp.gate_proj.weight` (dense layers);
/// - embeddings: `embed_tokens.weight`, `lm_head.weight`, `shared_head.head.weight` (MTP).
const RULES: [(Group, &str); 7] = [
    (Group::Experts, r"\.(mlp|block_sparse_moe)\.experts\."),
    (
        Group::SharedExperts,
        r"\.mlp\.shared_experts?\.|\.mlp\.shared_expert_gate\.",
    ),
    (
        Group::Router,
        r"\.(mlp|block_sparse_moe)\.(gate|router)\.(weight|bias|e_score_correction_bias)$",
    ),
    (Group::Norms, r"norm\.(weight|bias)$"),
    (Group::Attention, r"\.self_attn\."),
    (Group::DenseMlp, r"\.mlp\.(gate|up|down|gate_up)_proj\."),
    (
        Group::Embeddings,
        r"(embed_tokens|lm_head|shared_head\.head)\.weight$",
    ),
];

impl Group {
    /// All groups in matching order.
    pub const ALL: [Group; 8] = [
        Group::Experts,
        Group::SharedExperts,
        Group::Router,
        Group::Norms,
        Group::Attention,
        Group::DenseMlp,
        Group::Embeddings,
        Group::Other,
    ];

    /// The name used in flags and reports.
    pub fn name(self) -> &'static str {
        match self {
            Group::Experts => "experts",
            Group::SharedExperts => "shared-experts",
            Group::Router => "router",
            Group::Norms => "norms",
            Group::Attention => "attention",
            Group::DenseMlp => "dense-mlp",
            Group::Embeddings => "embeddings",
            Group::Other => "other",
        }
    }

    /// Parses a group name.
    pub fn parse(s: &str) -> Option<Group> {
        Group::ALL.into_iter().find(|g| g.name() == s)
    }

    /// The group of a weight name: the first rule whose pattern matches.
    pub fn of(name: &str) -> Group {
        // One pass of a RegexSet over the name instead of one search per pattern.
        static SET: OnceLock<RegexSet> = OnceLock::new();
        let set = SET.get_or_init(|| {
            RegexSet::new(RULES.iter().map(|(_, p)| p)).expect("group patterns are valid")
        });
        set.matches(name)
            .iter()
            .next()
            .and_then(|i| RULES.get(i).map(|(g, _)| *g))
            .unwrap_or(Group::Other)
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The decoder layer a tensor name belongs to (`model.layers.N.`), if any.
pub(crate) fn layer_of(name: &str) -> Option<u32> {
    let rest = name.split("layers.").nth(1)?;
    let digits: &str = &rest[..rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len())];
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real names of each family (as transformers 5 saves them), with their group.
    fn check(family: &str, cases: &[(&str, Group)]) {
        for (name, want) in cases {
            assert_eq!(Group::of(name), *want, "{family}: {name}");
        }
    }

    #[test]
    fn deepseek_kimi_glm_names() {
        use Group::*;
        let l = "model.layers.3.";
        let cases = [
            (format!("{l}mlp.experts.17.gate_proj.weight"), Experts),
            (
                format!("{l}mlp.experts.17.down_proj.weight_scale_inv"),
                Experts,
            ),
            (
                format!("{l}mlp.shared_experts.up_proj.weight"),
                SharedExperts,
            ),
            (format!("{l}mlp.gate.weight"), Router),
            (format!("{l}mlp.gate.e_score_correction_bias"), Router),
            (format!("{l}self_attn.q_a_layernorm.weight"), Norms),
            (format!("{l}self_attn.kv_a_proj_with_mqa.weight"), Attention),
            (format!("{l}self_attn.q_norm.weight"), Norms),
            (format!("{l}self_attn.q_proj.bias"), Attention),
            (format!("{l}input_layernorm.weight"), Norms),
            ("model.layers.0.mlp.down_proj.weight".into(), DenseMlp),
            ("model.embed_tokens.weight".into(), Embeddings),
            ("lm_head.weight".into(), Embeddings),
            ("model.layers.61.shared_head.head.weight".into(), Embeddings),
            ("model.layers.61.eh_proj.weight".into(), Other),
            ("model.layers.61.enorm.weight".into(), Norms),
        ];
        let cases: Vec<(&str, Group)> = cases.iter().map(|(n, g)| (n.as_str(), *g)).collect();
        check("deepseek", &cases);
    }

    #[test]
    fn mixtral_names() {
        use Group::*;
        check(
            "mixtral",
            &[
                (
                    "model.layers.1.block_sparse_moe.experts.3.w1.weight",
                    Experts,
                ),
                (
                    "model.layers.1.block_sparse_moe.experts.3.w2.weight",
                    Experts,
                ),
                ("model.layers.1.block_sparse_moe.gate.weight", Router),
                ("model.layers.1.self_attn.o_proj.weight", Attention),
                ("model.layers.1.post_attention_layernorm.weight", Norms),
            ],
        );
    }

    #[test]
    fn qwen_and_olmoe_names() {
        use Group::*;
        check(
            "qwen2-moe",
            &[
                ("model.layers.1.mlp.experts.0.up_proj.weight", Experts),
                (
                    "model.layers.1.mlp.shared_expert.gate_proj.weight",
                    SharedExperts,
                ),
                (
                    "model.layers.1.mlp.shared_expert_gate.weight",
                    SharedExperts,
                ),
                ("model.layers.1.mlp.gate.weight", Router),
                ("model.layers.1.self_attn.k_proj.bias", Attention),
                ("model.layers.0.mlp.up_proj.weight", DenseMlp),
            ],
        );
        check(
            "qwen3-moe / olmoe",
            &[
                ("model.layers.1.mlp.experts.5.down_proj.weight", Experts),
                ("model.layers.1.self_attn.k_norm.weight", Norms),
                ("model.norm.weight", Norms),
            ],
        );
    }

    #[test]
    fn gpt_oss_names() {
        use Group::*;
        check(
            "gpt-oss",
            &[
                ("model.layers.0.mlp.experts.gate_up_proj", Experts),
                ("model.layers.0.mlp.experts.gate_up_proj_bias", Experts),
                ("model.layers.0.mlp.experts.down_proj", Experts),
                ("model.layers.0.mlp.experts.down_proj_blocks", Experts),
                ("model.layers.0.mlp.experts.down_proj_scales", Experts),
                ("model.layers.0.mlp.router.weight", Router),
                ("model.layers.0.mlp.router.bias", Router),
                ("model.layers.0.self_attn.sinks", Attention),
                ("model.layers.0.self_attn.q_proj.bias", Attention),
            ],
        );
    }

    #[test]
    fn every_rule_is_first_for_some_name_and_names_round_trip() {
        for g in Group::ALL {
            assert_eq!(Group::parse(g.name()), Some(g));
        }
        assert_eq!(Group::parse("expert"), None);
        assert_eq!(layer_of("model.layers.12.mlp.gate.weight"), Some(12));
        assert_eq!(layer_of("lm_head.weight"), None);
    }
}
