//! The admin port: `GET /health` (JSON), `GET /metrics` (Prometheus text), and, when the
//! server runs with fault injection enabled, `POST /fault?volume=V&op=read|write|sync&errno=N`.
//! A small HTTP/1.1 responder: one request per connection, bounded header size.

use crate::server::volume::{PeerState, Role};
use crate::server::ServerCtx;
use crate::store::FaultOp;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_REQUEST_HEAD: usize = 8192;

pub fn health_json(ctx: &ServerCtx) -> Value {
    let now_ms = ctx.started.elapsed().as_millis() as u64;
    let vols: Vec<Value> = ctx
        .all_volumes()
        .iter()
        .map(|v| {
            let (g, e) = v.fence();
            let (role, primary) = match v.role() {
                Role::Primary { .. } => ("primary", Some(ctx.config.server_id.clone())),
                Role::Secondary { primary } => ("secondary", primary),
            };
            let peers: Vec<Value> = v
                .peers()
                .iter()
                .map(|p| {
                    json!({
                        "server_id": p.server_id,
                        "state": p.state(),
                        "dirty_regions": p.dirty_regions(),
                        "copy_done": p.copy_done.load(Ordering::Relaxed),
                        "copy_total": p.copy_total.load(Ordering::Relaxed),
                        "full_rebuild": p.full_rebuild.load(Ordering::Relaxed),
                        "failures": p.failures.load(Ordering::Relaxed),
                    })
                })
                .collect();
            let degraded = v.peers().iter().any(|p| p.state() != PeerState::InSync);
            let last_ok = v.stats.last_ok_ms.load(Ordering::Relaxed);
            let meta = v.replica.meta();
            let (unsettled, unsettled_unknown) = v.unsettled();
            json!({
                "volume": v.name.as_str(),
                "role": role,
                "primary": primary,
                "generation": g,
                "epoch": e,
                "lease_valid": v.lease_valid(),
                "accepting_io": v.accepting_io(),
                "io_stalled": v.io_stalled(),
                "lease_remaining_ms": v.lease_remaining_ms(),
                "degraded": role == "primary" && degraded,
                "peers": peers,
                "in_sync_peers": v.peers().iter().filter(|p| p.state() == PeerState::InSync).map(|p| p.server_id.clone()).collect::<Vec<_>>(),
                "synced": meta.synced,
                "followed_epoch": meta.followed_epoch,
                "unsettled_regions": unsettled,
                "unsettled_unknown": unsettled_unknown,
                "resynced_regions": v.stats.resynced_regions.load(Ordering::Relaxed),
                "disk_errors": v.replica.disk_errors.load(Ordering::Relaxed),
                "inflight": v.stats.inflight.load(Ordering::Relaxed),
                "last_ok_io_ms_ago": if last_ok == 0 { Value::Null } else { json!(now_ms.saturating_sub(last_ok)) },
            })
        })
        .collect();
    json!({
        "server_id": ctx.config.server_id,
        "site": ctx.config.site,
        "data_addr": ctx.data_addr.to_string(),
        "uptime_ms": now_ms,
        "bad_frames": ctx.stats.bad_frames.load(Ordering::Relaxed),
        "authenticates": ctx.config.peer_key.is_some(),
        "auth_failures": ctx.stats.auth_failures.load(Ordering::Relaxed),
        "volumes": vols,
    })
}

pub fn metrics_text(ctx: &ServerCtx) -> String {
    let mut s = String::new();
    let sid = &ctx.config.server_id;
    let _ = writeln!(s, "# TYPE replicator_bad_frames_total counter");
    let _ = writeln!(
        s,
        "replicator_bad_frames_total{{server=\"{sid}\"}} {}",
        ctx.stats.bad_frames.load(Ordering::Relaxed)
    );
    let _ = writeln!(s, "# TYPE replicator_auth_failures_total counter");
    let _ = writeln!(
        s,
        "replicator_auth_failures_total{{server=\"{sid}\"}} {}",
        ctx.stats.auth_failures.load(Ordering::Relaxed)
    );
    let _ = writeln!(s, "# TYPE replicator_connections_total counter");
    let _ = writeln!(
        s,
        "replicator_connections_total{{server=\"{sid}\"}} {}",
        ctx.stats.connections.load(Ordering::Relaxed)
    );
    let gauges: &[(&str, &str)] = &[
        ("replicator_volume_primary", "gauge"),
        ("replicator_volume_lease_valid", "gauge"),
        ("replicator_volume_degraded", "gauge"),
        ("replicator_volume_epoch", "gauge"),
        ("replicator_volume_inflight", "gauge"),
        ("replicator_volume_writes_total", "counter"),
        ("replicator_volume_reads_total", "counter"),
        ("replicator_volume_flushes_total", "counter"),
        ("replicator_volume_errors_total", "counter"),
        ("replicator_volume_disk_errors_total", "counter"),
        ("replicator_volume_replicated_applied_total", "counter"),
        ("replicator_volume_degraded_events_total", "counter"),
        ("replicator_volume_catchup_regions_copied_total", "counter"),
        ("replicator_volume_resynced_regions_total", "counter"),
        ("replicator_volume_unsettled_regions", "gauge"),
    ];
    let vols = ctx.all_volumes();
    for (name, kind) in gauges {
        let _ = writeln!(s, "# TYPE {name} {kind}");
        for v in &vols {
            let st = &v.stats;
            let primary = matches!(v.role(), Role::Primary { .. });
            let val = match *name {
                "replicator_volume_primary" => primary as u64,
                "replicator_volume_lease_valid" => v.lease_valid() as u64,
                "replicator_volume_degraded" => {
                    (primary && v.peers().iter().any(|p| p.state() != PeerState::InSync)) as u64
                }
                "replicator_volume_epoch" => v.fence().1,
                "replicator_volume_inflight" => st.inflight.load(Ordering::Relaxed),
                "replicator_volume_writes_total" => st.writes.load(Ordering::Relaxed),
                "replicator_volume_reads_total" => st.reads.load(Ordering::Relaxed),
                "replicator_volume_flushes_total" => st.flushes.load(Ordering::Relaxed),
                "replicator_volume_errors_total" => st.errors.load(Ordering::Relaxed),
                "replicator_volume_disk_errors_total" => {
                    v.replica.disk_errors.load(Ordering::Relaxed)
                }
                "replicator_volume_replicated_applied_total" => {
                    st.replicated_applied.load(Ordering::Relaxed)
                }
                "replicator_volume_degraded_events_total" => {
                    st.degraded_events.load(Ordering::Relaxed)
                }
                "replicator_volume_resynced_regions_total" => {
                    st.resynced_regions.load(Ordering::Relaxed)
                }
                "replicator_volume_unsettled_regions" => v.unsettled().0 as u64,
                "replicator_volume_catchup_regions_copied_total" => {
                    st.copies_sent.load(Ordering::Relaxed)
                }
                other => unreachable!("no value for metric {other}"),
            };
            let _ = writeln!(s, "{name}{{server=\"{sid}\",volume=\"{}\"}} {val}", v.name);
        }
    }
    let _ = writeln!(s, "# TYPE replicator_peer_dirty_regions gauge");
    for v in &vols {
        for p in v.peers() {
            let _ = writeln!(
                s,
                "replicator_peer_dirty_regions{{server=\"{sid}\",volume=\"{}\",peer=\"{}\"}} {}",
                v.name,
                p.server_id,
                p.dirty_regions()
            );
        }
    }
    s
}

pub async fn serve_admin(ctx: Arc<ServerCtx>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), serve_http(ctx, stream)).await;
        });
    }
}

async fn serve_http(ctx: Arc<ServerCtx>, mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > MAX_REQUEST_HEAD {
            return respond(&mut s, 431, "text/plain", "request head too large\n").await;
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match (method, path) {
        ("GET", "/health") => {
            let body = serde_json::to_string_pretty(&health_json(&ctx)).expect("json");
            respond(&mut s, 200, "application/json", &body).await
        }
        ("GET", "/metrics") => {
            respond(
                &mut s,
                200,
                "text/plain; version=0.0.4",
                &metrics_text(&ctx),
            )
            .await
        }
        ("POST", "/fault") if ctx.config.enable_fault_injection => match set_fault(&ctx, query) {
            Ok(()) => respond(&mut s, 200, "text/plain", "ok\n").await,
            Err(e) => respond(&mut s, 400, "text/plain", &format!("{e}\n")).await,
        },
        ("POST", "/fault") => {
            respond(
                &mut s,
                403,
                "text/plain",
                "fault injection is disabled (--enable-fault-injection)\n",
            )
            .await
        }
        _ => respond(&mut s, 404, "text/plain", "not found\n").await,
    }
}

fn set_fault(ctx: &ServerCtx, query: &str) -> Result<(), String> {
    let mut vol = None;
    let mut op = None;
    let mut errno = None;
    for kv in query.split('&') {
        match kv.split_once('=') {
            Some(("volume", v)) => vol = Some(v.to_owned()),
            Some(("op", "read")) => op = Some(FaultOp::Read),
            Some(("op", "write")) => op = Some(FaultOp::Write),
            Some(("op", "sync")) => op = Some(FaultOp::Sync),
            Some(("errno", n)) => errno = n.parse::<i32>().ok(),
            _ => return Err(format!("bad query parameter {kv:?}")),
        }
    }
    let (Some(vol), Some(op), Some(errno)) = (vol, op, errno) else {
        return Err("need volume=, op=read|write|sync and errno=".into());
    };
    let name = crate::frame::VolumeName::new(&vol).map_err(|e| e.to_string())?;
    let v = ctx.volume(&name).ok_or("unknown volume")?;
    v.replica.faults.set(op, errno);
    tracing::warn!(volume = %vol, ?op, errno, "fault injection set");
    Ok(())
}

async fn respond(s: &mut TcpStream, code: u16, ctype: &str, body: &str) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Request Header Fields Too Large",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.shutdown().await
}
