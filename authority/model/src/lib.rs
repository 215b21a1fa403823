//! Nothing here: the model is `tests/txn_model.rs` (see docs/authority.md, "Model checking").
