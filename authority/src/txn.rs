//! Transactions across groups (volume promotion): not implemented yet.

use std::sync::Arc;

use serde_json::Value;

use crate::error::AuthError;
use crate::host::Host;

pub async fn call(_host: &Arc<Host>, method: &str, _params: Value) -> Result<Value, AuthError> {
    Err(AuthError::NotImplemented {
        what: format!("{method} (two-phase commit across groups)"),
    })
}
