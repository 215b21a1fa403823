//! Prometheus metrics over HTTP (`serve --metrics-addr`): per bdev its I/O counters and
//! latency histograms, and for replicated bdevs the primary, epoch, sync state and the
//! requests retried after a failover.
//!
//! One thread serves it with blocking std I/O: a scrape every few seconds needs nothing more,
//! and it keeps an HTTP stack out of the daemon. A scrape locks the target only to copy the
//! bdev list; a malformed request gets a 400 and the server goes on.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read as _, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::bdev::iostat::{IoSnapshot, LATENCY_BUCKETS_US};
use crate::bdev::replicated::ReplicatedBdev;
use crate::bdev::Bdev;
use crate::target::Target;
use replicator::pipeline::PipelineStatus;

/// A counter: name, help, and how to read it.
type Series<T> = (&'static str, &'static str, fn(&T) -> u64);
/// Name, Prometheus type, help, and how to read it.
type Metric<T> = (&'static str, &'static str, &'static str, fn(&T) -> u64);

/// The metrics page of every bdev of `target`.
pub fn render(target: &Mutex<Target>) -> String {
    let bdevs: Vec<Arc<dyn Bdev>> = target
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .bdevs()
        .cloned()
        .collect();
    let mut out = String::new();
    let snaps: Vec<_> = bdevs
        .iter()
        .map(|b| (b.info().name.clone(), b.iostat().snapshot()))
        .collect();
    let counters: [Series<IoSnapshot>; 8] = [
        ("tandem_bdev_read_ops_total", "Reads completed", |s| {
            s.num_read_ops
        }),
        ("tandem_bdev_read_bytes_total", "Bytes read", |s| {
            s.bytes_read
        }),
        ("tandem_bdev_write_ops_total", "Writes completed", |s| {
            s.num_write_ops
        }),
        ("tandem_bdev_write_bytes_total", "Bytes written", |s| {
            s.bytes_written
        }),
        ("tandem_bdev_unmap_ops_total", "Discards completed", |s| {
            s.num_unmap_ops
        }),
        (
            "tandem_bdev_write_zeroes_ops_total",
            "Write-zeroes completed",
            |s| s.num_write_zeroes_ops,
        ),
        ("tandem_bdev_flush_ops_total", "Flushes completed", |s| {
            s.num_flush_ops
        }),
        (
            "tandem_bdev_io_errors_total",
            "Requests completed with an error",
            |s| s.num_io_errors,
        ),
    ];
    for (name, help, get) in counters {
        family(&mut out, name, "counter", help);
        for (b, s) in &snaps {
            let _ = writeln!(out, "{name}{{bdev=\"{}\"}} {}", escape(b), get(s));
        }
    }
    family(
        &mut out,
        "tandem_bdev_latency_seconds",
        "histogram",
        "Latency of completed reads and writes, as the guest sees it",
    );
    for (b, s) in &snaps {
        for (op, hist, sum_ns) in [
            ("read", &s.read_latency_histogram, s.read_latency_ticks),
            ("write", &s.write_latency_histogram, s.write_latency_ticks),
        ] {
            let b = escape(b);
            let mut cum = 0;
            for (i, c) in hist.iter().enumerate() {
                cum += c;
                let le = match LATENCY_BUCKETS_US.get(i) {
                    Some(us) => format!("{}", *us as f64 / 1e6),
                    None => "+Inf".into(),
                };
                let _ = writeln!(
                    out,
                    "tandem_bdev_latency_seconds_bucket{{bdev=\"{b}\",op=\"{op}\",le=\"{le}\"}} {cum}"
                );
            }
            let _ = writeln!(
                out,
                "tandem_bdev_latency_seconds_sum{{bdev=\"{b}\",op=\"{op}\"}} {}",
                sum_ns as f64 / 1e9
            );
            let _ = writeln!(
                out,
                "tandem_bdev_latency_seconds_count{{bdev=\"{b}\",op=\"{op}\"}} {cum}"
            );
        }
    }
    let replicated: Vec<_> = bdevs
        .iter()
        .filter_map(|b| {
            b.as_any()
                .downcast_ref::<ReplicatedBdev>()
                .map(|r| (b.info().name.clone(), r.status()))
        })
        .collect();
    let gauges: [Metric<PipelineStatus>; 5] = [
        (
            "tandem_replicated_epoch",
            "gauge",
            "Epoch of the volume's primary",
            |s| s.epoch,
        ),
        (
            "tandem_replicated_generation",
            "gauge",
            "Generation of the volume",
            |s| s.generation,
        ),
        (
            "tandem_replicated_degraded",
            "gauge",
            "1 while a replica of the volume is not in sync",
            |s| u64::from(!s.out_of_sync.is_empty()),
        ),
        (
            "tandem_replicated_retried_total",
            "counter",
            "Requests sent again after a failover, a fencing answer or a lost connection",
            |s| s.retried,
        ),
        (
            "tandem_replicated_primary_changes_total",
            "counter",
            "Times requests moved to a different primary",
            |s| s.primary_changes,
        ),
    ];
    for (name, kind, help, get) in gauges {
        family(&mut out, name, kind, help);
        for (b, s) in &replicated {
            let _ = writeln!(out, "{name}{{bdev=\"{}\"}} {}", escape(b), get(s));
        }
    }
    family(
        &mut out,
        "tandem_replicated_primary_unreachable_seconds",
        "gauge",
        "How long the primary could not be reached (0 while it can)",
    );
    for (b, s) in &replicated {
        let _ = writeln!(
            out,
            "tandem_replicated_primary_unreachable_seconds{{bdev=\"{}\"}} {}",
            escape(b),
            s.unreachable_ms.unwrap_or(0) as f64 / 1e3
        );
    }
    family(
        &mut out,
        "tandem_replicated_primary_info",
        "gauge",
        "The server requests go to (value 1)",
    );
    for (b, s) in &replicated {
        if let Some(p) = &s.primary {
            let _ = writeln!(
                out,
                "tandem_replicated_primary_info{{bdev=\"{}\",primary=\"{}\"}} 1",
                escape(b),
                escape(p)
            );
        }
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The HTTP listener of `/metrics`. Stops when dropped.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetricsServer {
    pub fn start(addr: &str, target: Arc<Mutex<Target>>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            if let Err(e) = answer(conn, &target) {
                                tracing::debug!(error = %e, "metrics request");
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "metrics accept");
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })?;
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn answer(conn: TcpStream, target: &Mutex<Target>) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut r = BufReader::new(conn.try_clone()?.take(8192));
    let mut line = String::new();
    r.read_line(&mut line)?;
    // Headers are read and ignored up to the blank line.
    let mut h = String::new();
    while r.read_line(&mut h)? > 2 {
        h.clear();
    }
    let mut w = conn;
    let (status, ctype, body) = match line.split_whitespace().collect::<Vec<_>>()[..] {
        ["GET", "/metrics", _] => ("200 OK", "text/plain; version=0.0.4", render(target)),
        ["GET", _, _] => (
            "404 Not Found",
            "text/plain",
            "only /metrics is here\n".into(),
        ),
        _ => ("400 Bad Request", "text/plain", "not an HTTP GET\n".into()),
    };
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::fakes::target;

    fn get(addr: SocketAddr, req: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn metrics_page_has_counters_and_cumulative_histograms_and_bad_requests_get_400() {
        let t = Arc::new(Mutex::new(target()));
        t.lock()
            .unwrap()
            .create_null_bdev("Null0", 1024, 512, None)
            .unwrap();
        {
            let g = t.lock().unwrap();
            let c = g.bdev("Null0").unwrap().iostat().register_channel();
            c.record(crate::bdev::IoOp::Read, 4096, 30_000, true);
            c.record(crate::bdev::IoOp::Read, 4096, 3_000_000, true);
        }
        let m = MetricsServer::start("127.0.0.1:0", t).unwrap();
        let page = get(m.addr(), "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
        assert!(
            page.contains("tandem_bdev_read_ops_total{bdev=\"Null0\"} 2"),
            "{page}"
        );
        assert!(page.contains(
            "tandem_bdev_latency_seconds_bucket{bdev=\"Null0\",op=\"read\",le=\"0.00005\"} 1"
        ));
        assert!(page.contains(
            "tandem_bdev_latency_seconds_bucket{bdev=\"Null0\",op=\"read\",le=\"+Inf\"} 2"
        ));
        assert!(page.contains("tandem_bdev_latency_seconds_count{bdev=\"Null0\",op=\"read\"} 2"));
        assert!(get(m.addr(), "GET /other HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get(m.addr(), "\x00\x01garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
        // Still serving after the garbage.
        assert!(get(m.addr(), "GET /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.1 200"));
    }
}
