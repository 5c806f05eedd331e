//! The two rules every optimizer of a run shares, whether Burn's per parameter
//! ([`crate::optim`]) or the flat one sharded over MPI ranks ([`crate::sharded`]): which
//! parameters skip weight decay, and the factor that clips gradients by their global norm.

use burn::module::ParamGroup;

use crate::config::OptimConfig;

/// Parameter paths excluded from weight decay unless `decay_norms_and_embeddings` is set.
pub const NO_DECAY: &[&str] = &["norm", "tok_embeddings"];

/// The parameters exempt from weight decay (norms and embeddings, unless
/// `optim.decay_norms_and_embeddings`), or None when all decay alike.
pub fn no_decay_group(config: &OptimConfig) -> Option<ParamGroup> {
    (!config.decay_norms_and_embeddings && config.weight_decay > 0.0).then(|| ParamGroup::from_any_predicates(NO_DECAY.to_vec()))
}

/// What gradients of global norm `norm` are multiplied by to clip them to `max_norm` (0: no
/// clipping); 1 when they are within it, or when the norm is not finite (the step is skipped).
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm.is_finite() && norm > max_norm { max_norm / (norm + 1e-6) } else { 1.0 }
}
