//! The running daemon: the host of groups plus its JSON-RPC listeners.

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::AuthorityConfig;
use crate::host::{Host, StartError};

pub struct Daemon {
    pub host: Arc<Host>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Daemon {
    /// Start every group and serve JSON-RPC on the configured TCP address and Unix socket.
    pub async fn start(config: AuthorityConfig) -> Result<Daemon, StartError> {
        let rpc = TcpListener::bind(&config.rpc_addr)
            .await
            .map_err(|source| StartError::Io {
                what: format!("bind rpc address {}", config.rpc_addr),
                source,
            })?;
        let unix = config.unix_socket.clone();
        let host = Host::start(config).await?;
        let recovery = std::time::Duration::from_millis(host.config.txn_recovery_after_ms);
        let mut tasks = vec![
            tokio::spawn(crate::rpc::serve_tcp(host.clone(), rpc)),
            tokio::spawn(crate::txn::recovery_loop(host.clone(), recovery)),
        ];
        if let Some(path) = unix {
            tasks.push(
                crate::rpc::serve_unix(host.clone(), &path)
                    .await
                    .map_err(|source| StartError::Io {
                        what: format!("bind unix socket {}", path.display()),
                        source,
                    })?,
            );
        }
        Ok(Daemon { host, tasks })
    }

    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(p) = &self.host.config.unix_socket {
            let _ = std::fs::remove_file(p);
        }
        self.host.shutdown().await;
    }
}
