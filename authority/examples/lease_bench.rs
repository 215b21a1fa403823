//! Lease renewal benchmark: closed-loop renewals against a running authority.
//!
//!     cargo run --release -p authority --example lease_bench -- --addrs 127.0.0.1:7300 \
//!         --volumes 512 --connections 4 --seconds 10
//!
//! Creates `volumes` volumes in site-a (one primary each), acquires their leases, then keeps
//! one renewal in flight per volume for `seconds`, spread over `connections` TCP
//! connections. Prints renewals per second and latency percentiles. ci/bench-authority.sh
//! starts the daemons and runs this.

use std::sync::Arc;
use std::time::{Duration, Instant};

use authority::client::{AuthorityClient, ClientOptions};

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let addrs: Vec<String> = arg(&args, "--addrs", "127.0.0.1:7300")
        .split(',')
        .map(String::from)
        .collect();
    let volumes: usize = arg(&args, "--volumes", "512").parse()?;
    let connections: usize = arg(&args, "--connections", "4").parse()?;
    let seconds: u64 = arg(&args, "--seconds", "10").parse()?;
    let site = "site-a";
    let opts = ClientOptions {
        deadline: Duration::from_secs(30),
        ..Default::default()
    };
    let clients: Vec<Arc<AuthorityClient>> = (0..connections)
        .map(|_| Arc::new(AuthorityClient::with_options(addrs.clone(), opts.clone())))
        .collect();

    let mut tasks = Vec::new();
    for i in 0..volumes {
        let c = clients[i % connections].clone();
        tasks.push(tokio::spawn(async move {
            let (server, volume) = (format!("bench-s{i}"), format!("bench-v{i}"));
            c.server_register(site, &server, "d", "a").await?;
            c.volume_create(site, &volume, "bench", 1 << 20, 512, &[&server])
                .await?;
            let g = c.lease_acquire(site, &volume, &server).await?;
            Ok::<_, authority::AuthError>(g.epoch)
        }));
    }
    let mut epochs = Vec::new();
    for t in tasks {
        epochs.push(t.await??);
    }

    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for (i, epoch) in epochs.into_iter().enumerate() {
        let c = clients[i % connections].clone();
        tasks.push(tokio::spawn(async move {
            let (server, volume) = (format!("bench-s{i}"), format!("bench-v{i}"));
            let mut lat = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < end {
                let t = Instant::now();
                match c.lease_renew(site, &volume, &server, epoch).await {
                    Ok(_) => lat.push(t.elapsed().as_micros() as u32),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    println!(
        "renewals {} in {:.1}s = {:.0}/s, errors {}, latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
        all.len(),
        elapsed,
        all.len() as f64 / elapsed,
        errors,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(0.999),
        all.last().copied().unwrap_or(0) as f64 / 1000.0,
    );
    Ok(())
}
