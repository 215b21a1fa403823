//! Queue workers.
