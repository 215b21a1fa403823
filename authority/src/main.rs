//! `authority`: the daemon (`serve`) and a JSON-RPC client (`rpc`).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use authority::client::AuthorityClient;
use authority::config::{AuthorityConfig, MemberConfig};
use authority::daemon::Daemon;

#[derive(Parser)]
#[command(
    name = "authority",
    about = "Tandem's two-tier authority (Raft groups for leases, epochs, generations)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon. With no options: one member hosting the global group and the groups of
    /// site-a and site-b, data under /var/lib/tandem/authority.
    Serve {
        /// A JSON configuration file (see `authority default-config`); options below override it.
        #[arg(short, long)]
        config: Option<PathBuf>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        node_id: Option<u64>,
        #[arg(long)]
        rpc_addr: Option<String>,
        #[arg(long)]
        raft_addr: Option<String>,
        /// Listen for Raft traffic here instead of on --raft-addr (which peers dial).
        #[arg(long)]
        raft_listen_addr: Option<String>,
        /// Unix socket for JSON-RPC; "none" for no socket.
        #[arg(long)]
        unix_socket: Option<String>,
        /// Comma-separated site names.
        #[arg(long, value_delimiter = ',')]
        sites: Option<Vec<String>>,
        /// Members as ID=RAFT_ADDR=RPC_ADDR, comma-separated.
        #[arg(long, value_delimiter = ',')]
        members: Option<Vec<String>>,
        #[arg(long)]
        lease_ms: Option<u64>,
    },
    /// Print the embedded default configuration as JSON.
    DefaultConfig,
    /// Send one JSON-RPC request and print the result.
    Rpc {
        /// Member RPC addresses (TCP); the client finds the leader. Default 127.0.0.1:7300.
        #[arg(short, long)]
        addr: Vec<String>,
        /// Talk to this Unix socket instead (no leader following).
        #[arg(short, long)]
        socket: Option<PathBuf>,
        method: String,
        /// One JSON object, or key=value pairs (a value is read as JSON when it parses).
        params: Vec<String>,
    },
}

fn parse_params(args: &[String]) -> anyhow::Result<Value> {
    if args.len() == 1 && args[0].trim_start().starts_with('{') {
        return serde_json::from_str(&args[0]).context("params are not a JSON object");
    }
    let mut m = serde_json::Map::new();
    for a in args {
        let (k, v) = a
            .split_once('=')
            .with_context(|| format!("expected key=value, got {a:?}"))?;
        let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        m.insert(k.to_string(), v);
    }
    Ok(Value::Object(m))
}

fn parse_member(s: &str) -> anyhow::Result<MemberConfig> {
    let parts: Vec<&str> = s.split('=').collect();
    if parts.len() != 3 {
        bail!("member {s:?} is not ID=RAFT_ADDR=RPC_ADDR");
    }
    Ok(MemberConfig {
        id: parts[0].parse()?,
        raft_addr: parts[1].into(),
        rpc_addr: parts[2].into(),
    })
}

async fn rpc_unix(path: &PathBuf, method: &str, params: Value) -> anyhow::Result<Value> {
    let s = tokio::net::UnixStream::connect(path)
        .await
        .with_context(|| format!("connect {}", path.display()))?;
    let (rd, mut wr) = s.into_split();
    let mut line = serde_json::to_vec(
        &serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}),
    )?;
    line.push(b'\n');
    wr.write_all(&line).await?;
    let mut answer = String::new();
    BufReader::new(rd).read_line(&mut answer).await?;
    let v: Value = serde_json::from_str(&answer)?;
    if let Some(e) = v.get("error") {
        eprintln!("{e}");
        std::process::exit(1);
    }
    Ok(v["result"].clone())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::DefaultConfig => {
            println!(
                "{}",
                serde_json::to_string_pretty(&AuthorityConfig::default())?
            );
        }
        Cmd::Serve {
            config,
            data_dir,
            node_id,
            rpc_addr,
            raft_addr,
            raft_listen_addr,
            unix_socket,
            sites,
            members,
            lease_ms,
        } => {
            let mut c = match config {
                Some(p) => {
                    let text = std::fs::read_to_string(&p)
                        .with_context(|| format!("read {}", p.display()))?;
                    serde_json::from_str(&text).with_context(|| format!("parse {}", p.display()))?
                }
                None => AuthorityConfig::default(),
            };
            if let Some(d) = data_dir {
                c.data_dir = d;
            }
            if let Some(n) = node_id {
                c.node_id = n;
            }
            if let Some(a) = rpc_addr {
                c.rpc_addr = a;
            }
            if let Some(a) = raft_addr {
                c.raft_addr = a;
            }
            if let Some(a) = raft_listen_addr {
                c.raft_listen_addr = Some(a);
            }
            if let Some(u) = unix_socket {
                c.unix_socket = if u == "none" { None } else { Some(u.into()) };
            }
            if let Some(s) = sites {
                c.sites = s;
            }
            if let Some(m) = members {
                c.members = m
                    .iter()
                    .map(|s| parse_member(s))
                    .collect::<anyhow::Result<_>>()?;
            }
            if let Some(l) = lease_ms {
                c.lease_ms = l;
            }
            c.validate().map_err(anyhow::Error::msg)?;
            let daemon = Daemon::start(c.clone()).await?;
            tracing::info!(node_id = c.node_id, rpc = %c.rpc_addr, raft = %c.raft_addr, data = %c.data_dir.display(), "authority serving");
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            daemon.shutdown().await;
        }
        Cmd::Rpc {
            addr,
            socket,
            method,
            params,
        } => {
            let params = parse_params(&params)?;
            let result = match socket {
                Some(p) => rpc_unix(&p, &method, params).await?,
                None => {
                    let addrs = if addr.is_empty() {
                        vec!["127.0.0.1:7300".to_string()]
                    } else {
                        addr
                    };
                    match AuthorityClient::new(addrs).call(&method, params).await {
                        Ok(v) => v,
                        Err(e) => {
                            eprintln!(
                                "{}",
                                serde_json::json!({"code": e.code(), "message": e.to_string(), "data": e.data()})
                            );
                            std::process::exit(1);
                        }
                    }
                }
            };
            println!("{}", serde_json::to_string_pretty(&result)?);
        }
    }
    Ok(())
}
