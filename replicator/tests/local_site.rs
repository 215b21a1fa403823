//! `replicator::local_site`: one call starts an authority and two real `replicator serve`
//! processes on loopback; the client library writes and verifies; kill -9 of the primary is
//! noticed by the site's monitor, which asks the authority for a failover; the client
//! follows to the new primary and every acknowledged write reads back.

mod common;

use anyhow::{Context, Result};
use common::{read_block, write_blocks};
use replicator::local_site::{LocalSite, LocalSiteOptions, ServerCommand};
use replicator::pipeline::{PipelineConfig, ReplicationPipeline};
use replicator::stamp::parse_stamp;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const VOL: &str = "vol-local";

fn options() -> LocalSiteOptions {
    let cmd = ServerCommand {
        program: PathBuf::from(env!("CARGO_BIN_EXE_replicator")),
        args_prefix: vec!["serve".into()],
    };
    let mut o = LocalSiteOptions::new(VOL, 64 << 20, cmd);
    o.lease_ms = 1000;
    o.server_args = ["--replicate-timeout-ms", "400", "--refresh-ms", "50"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    o
}

fn verify(
    w: &replicator::pipeline::PipelineWorker,
    blocks: std::ops::Range<u64>,
    id: impl Fn(u64) -> u64,
) -> Result<()> {
    for b in blocks {
        let data = read_block(w, b)?;
        let s = parse_stamp(&data).with_context(|| format!("block {b} not stamped"))?;
        assert_eq!(
            (s.volume.as_str(), s.block, s.write_id),
            (VOL, b, id(b)),
            "block {b}"
        );
    }
    Ok(())
}

#[test]
fn local_site_survives_kill9_of_the_primary_through_its_monitor() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut site = LocalSite::start(root.path(), options())?;
    assert_eq!(site.servers().len(), 2);
    let first = site.primary().context("a primary")?;
    let other = site.secondary().context("a secondary")?;

    let mut cfg = PipelineConfig::new(&site.opts.site, VOL, site.authority());
    cfg.request_timeout = Duration::from_secs(30);
    let p = ReplicationPipeline::start(cfg)?;
    let w = p.worker(16)?;
    assert_eq!(write_blocks(&w, VOL, 0..200, 1)?.len(), 200);
    verify(&w, 0..200, |_| 1)?;
    // Both replicas hold every acknowledged write (in sync: acked only once both had it).
    common::files_equal_blocks(
        &site.server(&first)?.data_file(VOL),
        &site.server(&other)?.data_file(VOL),
        0..200,
    )?;

    // kill -9 from outside the site object, as an operator would (`kill -9 PID`).
    let pid = site.server(&first)?.pid().context("pid")?;
    // SAFETY: kill(2) on a child process of this test; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let end = Instant::now() + Duration::from_secs(30);
    let mut events = Vec::new();
    while !events
        .iter()
        .any(|e: &String| e.contains("asked the authority for a failover"))
    {
        assert!(
            Instant::now() < end,
            "monitor did not fail over: {events:?}"
        );
        events.extend(site.check_children());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!site.server(&first)?.is_running());
    assert_eq!(site.primary().as_deref(), Some(other.as_str()));
    site.wait_primary(&other, Duration::from_secs(30))?;

    // The same pipeline follows the new primary; old and new writes read back.
    assert_eq!(write_blocks(&w, VOL, 150..300, 2)?.len(), 150);
    verify(&w, 0..300, |b| if b < 150 { 1 } else { 2 })?;

    // The old primary comes back as a secondary and is caught up.
    site.restart(&first)?;
    site.wait_in_sync(Duration::from_secs(60))?;
    common::files_equal_blocks(
        &site.server(&first)?.data_file(VOL),
        &site.server(&other)?.data_file(VOL),
        0..300,
    )?;
    drop(w);
    drop(p);
    site.stop();
    Ok(())
}

#[test]
fn a_site_directory_can_be_started_again() -> Result<()> {
    let root = tempfile::tempdir()?;
    {
        let site = LocalSite::start(root.path(), options())?;
        let mut cfg = PipelineConfig::new(&site.opts.site, VOL, site.authority());
        cfg.request_timeout = Duration::from_secs(30);
        let p = ReplicationPipeline::start(cfg)?;
        let w = p.worker(8)?;
        assert_eq!(write_blocks(&w, VOL, 0..64, 7)?.len(), 64);
        common::flush(&w)?;
    }
    // Same directory: the authority's state, the volume and its data are still there.
    let site = LocalSite::start(root.path(), options())?;
    let mut cfg = PipelineConfig::new(&site.opts.site, VOL, site.authority());
    cfg.request_timeout = Duration::from_secs(30);
    let p = ReplicationPipeline::start(cfg)?;
    let w = p.worker(8)?;
    verify(&w, 0..64, |_| 7)?;
    Ok(())
}
