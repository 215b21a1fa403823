//! Real-guest tests: boot a Linux guest under QEMU whose only disk is a vhost-user-blk device
//! served by a backend on this host, drive the disk from inside the guest, and check what
//! reached the backing file.
//!
//! The guest is the kernel of the host's `linux-image-amd64` plus the tiny initramfs of
//! `ci/guest/build-initramfs.sh`; `ci/guest/run-guest.sh` boots it (KVM where it really works,
//! TCG otherwise) and hands back the guest script's output and exit status.
//!
//! What one run proves, end to end through virtio-blk and vhost-user:
//! - the guest sees the disk with the backing file's size (and, for Tandem, its serial);
//! - data the host wrote before boot reads back correctly in the guest (READ);
//! - an O_DIRECT write of a per-sector-distinct pattern reads back identical in the guest and
//!   lands byte for byte at the right offset of the host file (WRITE, no misplaced sectors);
//! - the last 4 KiB of the disk can be written (size/bounds agree on both sides);
//! - fsync on the device completes (FLUSH, when the device advertises a write-back cache);
//! - `blkdiscard` on a range completes and the range then reads as zeroes on the host (DISCARD).
//!
//! Without `qemu-system-x86_64` (or a guest kernel) the tests print why and pass, unless
//! `TANDEM_REQUIRE_GUEST=1` is set, as `ci/test.sh` does, which makes them fail instead.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// Size of the disk the guest sees.
const DISK_BYTES: u64 = 64 << 20;
/// Where the guest writes its pattern, and how much.
const WRITE_OFFSET: u64 = 8 << 20;
const WRITE_BYTES: u64 = 1 << 20;
/// Where the host writes a pattern before boot for the guest to read.
const HOST_PATTERN_OFFSET: u64 = 16 << 20;
/// The range the guest discards; the host fills it with 0xEE before boot.
const DISCARD_OFFSET: u64 = 32 << 20;
const DISCARD_BYTES: u64 = 1 << 20;
/// Bound on one guest run (boot + script + power-off). A TCG boot takes a few seconds.
const GUEST_TIMEOUT: Duration = Duration::from_secs(240);
/// Bound on a server creating its socket.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(20);

/// Per-sector-distinct pattern: sector `i` repeats `"<tag>-<i>-"`. The guest builds the same
/// bytes with awk (see `GUEST_SCRIPT`), so a misplaced or torn sector is caught on both sides.
fn pattern(tag: &str, bytes: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes as usize);
    for i in 0..bytes / 512 {
        let unit = format!("{tag}-{i:06}-");
        let sector: Vec<u8> = unit.bytes().cycle().take(512).collect();
        out.extend_from_slice(&sector);
    }
    out
}

/// The guest scripts' `pat TAG SECTORS`: the per-sector pattern of [`pattern`], in awk.
const PAT_FN: &str = r#"
pat() { # tag sectors -> per-sector pattern on stdout, same as pattern() in guest.rs
    awk -v tag="$1" -v n="$2" 'BEGIN { for (i = 0; i < n; i++) {
        u = sprintf("%s-%06d-", tag, i); s = u; while (length(s) < 512) s = s u;
        printf "%s", substr(s, 1, 512) } }'
}
"#;

/// A guest script with [`PAT_FN`] defined first.
fn with_pat(script: &str) -> String {
    format!("{PAT_FN}{script}")
}

/// The script the guest's /init runs. `KEY value` lines are parsed by `parse_report`.
const GUEST_SCRIPT: &str = r#"
set -eu
dev=/dev/vda
echo "SIZE_SECTORS $(cat /sys/block/vda/size)"
echo "SERIAL $(cat /sys/block/vda/serial 2>/dev/null || echo -)"
echo "WRITE_CACHE $(cat /sys/block/vda/queue/write_cache | tr ' ' _)"
echo "DISCARD_MAX_BYTES $(cat /sys/block/vda/queue/discard_max_bytes)"
echo "NR_HW_QUEUES $(ls /sys/block/vda/mq | wc -l)"

# READ: the pattern the host wrote before boot.
pat host 2048 > /tmp/host.pat
dd if=$dev of=/tmp/host.read bs=4096 skip=4096 count=256 iflag=direct 2>/dev/null
if cmp -s /tmp/host.pat /tmp/host.read; then echo "HOST_PATTERN_READ ok"; else echo "HOST_PATTERN_READ mismatch"; fi

# WRITE + read back, O_DIRECT, then fsync (FLUSH when the cache is write-back).
pat guest 2048 > /tmp/guest.pat
dd if=/tmp/guest.pat of=$dev bs=4096 seek=2048 count=256 oflag=direct conv=fsync 2>/dev/null
dd if=$dev of=/tmp/guest.read bs=4096 skip=2048 count=256 iflag=direct 2>/dev/null
if cmp -s /tmp/guest.pat /tmp/guest.read; then echo "GUEST_PATTERN_READBACK ok"; else echo "GUEST_PATTERN_READBACK mismatch"; fi

# The last 4 KiB of the disk.
last=$(( $(cat /sys/block/vda/size) / 8 - 1 ))
pat tail 8 > /tmp/tail.pat
dd if=/tmp/tail.pat of=$dev bs=4096 seek=$last count=1 oflag=direct conv=fsync 2>/dev/null
echo "TAIL_WRITE ok"

sync -d $dev
sync
echo "FLUSH ok"

# DISCARD, then what the guest reads there.
blkdiscard -o 33554432 -l 1048576 $dev
echo "DISCARD ok"
dd if=$dev of=/tmp/discard.read bs=4096 skip=8192 count=256 iflag=direct 2>/dev/null
dd if=/dev/zero of=/tmp/zero bs=4096 count=256 2>/dev/null
if cmp -s /tmp/zero /tmp/discard.read; then echo "DISCARD_READ zeroes"; else echo "DISCARD_READ data"; fi
echo "GUEST_DONE ok"
"#;

/// A child process that is killed (and reaped) when dropped, so a failing test leaves no
/// server or QEMU behind.
struct ChildGuard {
    name: &'static str,
    child: Child,
}

impl ChildGuard {
    fn spawn(name: &'static str, cmd: &mut Command) -> Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(Self { name, child })
    }

    /// Wait for `path` to appear while the child keeps running.
    fn wait_for_path(&mut self, path: &Path, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while !path.exists() {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited with {status} before creating {}",
                    self.name,
                    path.display()
                );
            }
            ensure!(
                start.elapsed() < timeout,
                "{} did not create {} within {timeout:?}",
                self.name,
                path.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for ChildGuard {
    /// SIGTERM first, so run-guest.sh's trap takes QEMU down with it and servers exit
    /// cleanly; SIGKILL if the child is still there after a few seconds.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
                // SAFETY: kill(2) with the pid of our own child, which has not been reaped
                // (try_wait returned None), so the pid cannot have been reused.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// What a backend is expected to show the guest, beyond the data itself.
struct Expectations {
    /// The virtio-blk serial (`VIRTIO_BLK_T_GET_ID`); `None` when the server cannot set one.
    serial: Option<&'static str>,
    /// `/sys/block/vda/queue/write_cache` with spaces as `_`; `None` to only report it.
    write_cache: Option<&'static str>,
}

/// A vhost-user-blk server exporting one file-backed disk on a Unix socket.
struct Server {
    _child: ChildGuard,
    socket: PathBuf,
    expect: Expectations,
}

impl Server {
    /// qemu-storage-daemon exporting `image` (file driver, hole-punching discard). It proves
    /// the harness against a known-good backend.
    fn qemu_storage_daemon(image: &Path, dir: &Path) -> Result<Self> {
        let socket = dir.join("qsd.sock");
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk0,filename={},discard=unmap",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},\
                 writable=on,num-queues=1,logical-block-size=512",
                socket.display()
            ));
        let mut child = ChildGuard::spawn("qemu-storage-daemon", &mut cmd)?;
        child.wait_for_path(&socket, SERVER_START_TIMEOUT)?;
        Ok(Self {
            _child: child,
            socket,
            expect: Expectations {
                // qsd cannot set a serial; it answers GET_ID with this fixed string, which
                // still proves GET_ID travels through the harness.
                serial: Some("vhost_user_blk"),
                // qsd's export shows the guest a write-through cache (no FLUSH is sent).
                write_cache: None,
            },
        })
    }

    /// Tandem's `vhost-target serve` with an SPDK-format config: a uring bdev on `image`
    /// exported as controller `vhost.0`.
    fn vhost_target(image: &Path, dir: &Path) -> Result<Self> {
        let sock_dir = dir.join("vhost");
        std::fs::create_dir_all(&sock_dir)?;
        let config = serde_json::json!({
            "subsystems": [
                {"subsystem": "bdev", "config": [
                    {"method": "bdev_uring_create",
                     "params": {"name": "Uring0", "filename": image, "block_size": 512}}
                ]},
                {"subsystem": "vhost_blk", "config": [
                    {"method": "vhost_create_blk_controller",
                     "params": {"ctrlr": "vhost.0", "dev_name": "Uring0", "cpumask": "0x1"}}
                ]}
            ]
        });
        let config_path = dir.join("config.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        let socket = sock_dir.join("vhost.0");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-target"));
        cmd.arg("serve")
            .arg("-r")
            .arg(dir.join("rpc.sock"))
            .arg("-S")
            .arg(&sock_dir)
            .arg("-c")
            .arg(&config_path);
        let mut child = ChildGuard::spawn("vhost-target", &mut cmd)?;
        child.wait_for_path(&socket, SERVER_START_TIMEOUT)?;
        Ok(Self {
            _child: child,
            socket,
            expect: Expectations {
                // SPDK answers GET_ID with the bdev name; Tandem follows it.
                serial: Some("Uring0"),
                write_cache: Some("write_back"),
            },
        })
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crate lives in the workspace")
        .to_path_buf()
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// `Ok(false)` (after saying why) when this machine cannot boot a guest and the caller did not
/// insist; an error when it cannot but `TANDEM_REQUIRE_GUEST=1`.
fn guest_available(server_program: Option<&str>) -> Result<bool> {
    let mut missing = Vec::new();
    for program in ["qemu-system-x86_64", "busybox", "cpio"]
        .into_iter()
        .chain(server_program)
    {
        if !on_path(program) {
            missing.push(program.to_string());
        }
    }
    let has_kernel = std::env::var_os("TANDEM_GUEST_KERNEL").is_some()
        || std::fs::read_dir("/boot").is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        });
    if !has_kernel {
        missing.push("a guest kernel (/boot/vmlinuz-*)".to_string());
    }
    if missing.is_empty() {
        return Ok(true);
    }
    let why = format!(
        "guest test needs {} (run ci/install-deps.sh)",
        missing.join(", ")
    );
    if std::env::var("TANDEM_REQUIRE_GUEST").is_ok_and(|v| v == "1") {
        bail!("{why}; TANDEM_REQUIRE_GUEST=1 forbids skipping");
    }
    eprintln!("SKIPPED: {why}");
    Ok(false)
}

/// A backing image under /var/tmp (a real disk, not tmpfs: O_DIRECT and hole punching behave
/// as in production), prepared with the host pattern and a 0xEE-filled discard range.
fn prepare_image(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("disk.img");
    let file = File::create(&path)?;
    file.set_len(DISK_BYTES)?;
    file.write_all_at(&pattern("host", WRITE_BYTES), HOST_PATTERN_OFFSET)?;
    file.write_all_at(&vec![0xEE; DISCARD_BYTES as usize], DISCARD_OFFSET)?;
    file.sync_all()?;
    Ok(path)
}

/// Boot the guest against `socket` with `script`; its `KEY value` report lines.
fn run_guest(dir: &Path, socket: &Path, script: &str) -> Result<HashMap<String, String>> {
    run_guest_with(dir, socket, script, false)
}

/// [`run_guest`], optionally booting the initramfs that carries fio.
fn run_guest_with(
    dir: &Path,
    socket: &Path,
    script: &str,
    fio: bool,
) -> Result<HashMap<String, String>> {
    let script_path = dir.join("guest-script.sh");
    std::fs::write(&script_path, script)?;
    let log = dir.join("console.log");
    let stderr_path = dir.join("run-guest.stderr");
    let runner = repo_root().join("ci/guest/run-guest.sh");
    let start = Instant::now();
    let mut child = ChildGuard::spawn(
        "run-guest.sh",
        Command::new(&runner)
            .arg("--script")
            .arg(&script_path)
            .arg("--vhost-user-blk")
            .arg(socket)
            .arg("--timeout")
            .arg(GUEST_TIMEOUT.as_secs().to_string())
            .arg("--log")
            .arg(&log)
            .args(fio.then_some("--fio"))
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr_path)?),
    )?;
    // run-guest.sh enforces GUEST_TIMEOUT on QEMU itself; read its output to the end.
    // (Its stderr goes to a file, so neither pipe can fill up while the other is read.)
    let mut stdout = String::new();
    child
        .child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut stdout)?;
    let status = child.child.wait()?;
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    eprintln!(
        "guest finished in {:.1}s: {}\n--- guest output ---\n{stdout}--- end ---",
        start.elapsed().as_secs_f64(),
        stderr.trim()
    );
    ensure!(
        status.success(),
        "guest script failed ({status}); console log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    Ok(parse_report(&stdout))
}

fn parse_report(stdout: &str) -> HashMap<String, String> {
    stdout
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(key, _)| {
            !key.is_empty() && key.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
        })
        .map(|(key, value)| (key.to_string(), value.trim().to_string()))
        .collect()
}

fn read_at(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut file = OpenOptions::new().read(true).open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0; len as usize];
    file.read_exact(&mut buf)?;
    Ok(buf)
}

/// The whole scenario against one server; see the module documentation.
fn guest_reads_writes_flushes_and_discards(
    server: &Server,
    image: &Path,
    dir: &Path,
) -> Result<()> {
    let report = run_guest(dir, &server.socket, &with_pat(GUEST_SCRIPT))?;
    let get = |key: &str| -> Result<&str> {
        report
            .get(key)
            .map(String::as_str)
            .with_context(|| format!("guest did not report {key}: {report:?}"))
    };

    assert_eq!(get("GUEST_DONE")?, "ok");
    assert_eq!(
        get("SIZE_SECTORS")?,
        (DISK_BYTES / 512).to_string(),
        "guest-visible size"
    );
    match server.expect.serial {
        Some(serial) => assert_eq!(get("SERIAL")?, serial, "guest-visible serial"),
        None => eprintln!(
            "serial not checked for this server (guest saw {:?})",
            get("SERIAL")?
        ),
    }
    match server.expect.write_cache {
        Some(mode) => assert_eq!(get("WRITE_CACHE")?, mode, "guest-visible write cache mode"),
        None => eprintln!(
            "write cache mode not checked (guest saw {})",
            get("WRITE_CACHE")?
        ),
    }
    assert_eq!(
        get("HOST_PATTERN_READ")?,
        "ok",
        "guest read of host-written data"
    );
    assert_eq!(
        get("GUEST_PATTERN_READBACK")?,
        "ok",
        "guest read-back of its own write"
    );
    assert_eq!(get("FLUSH")?, "ok");
    assert_eq!(get("DISCARD")?, "ok");
    assert_ne!(
        get("DISCARD_MAX_BYTES")?,
        "0",
        "device must advertise DISCARD"
    );

    let written = read_at(image, WRITE_OFFSET, WRITE_BYTES)?;
    assert!(
        written == pattern("guest", WRITE_BYTES),
        "host file at {WRITE_OFFSET:#x} does not hold the guest's pattern"
    );
    let tail = read_at(image, DISK_BYTES - 4096, 4096)?;
    assert!(
        tail == pattern("tail", 4096),
        "host file's last 4 KiB do not hold the guest's write"
    );
    let discarded = read_at(image, DISCARD_OFFSET, DISCARD_BYTES)?;
    assert!(
        discarded.iter().all(|&b| b == 0),
        "discarded range still holds data on the host"
    );
    assert_eq!(
        get("DISCARD_READ")?,
        "zeroes",
        "guest read of the discarded range"
    );
    assert_eq!(
        std::fs::metadata(image)?.len(),
        DISK_BYTES,
        "backing file size changed"
    );
    Ok(())
}

fn scratch_dir() -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix("tandem-guest-")
        .tempdir_in("/var/tmp")?)
}

#[test]
fn guest_disk_io_through_qemu_storage_daemon() -> Result<()> {
    if !guest_available(Some("qemu-storage-daemon"))? {
        return Ok(());
    }
    let dir = scratch_dir()?;
    let image = prepare_image(dir.path())?;
    let server = Server::qemu_storage_daemon(&image, dir.path())?;
    guest_reads_writes_flushes_and_discards(&server, &image, dir.path())
}

#[test]
fn guest_disk_io_through_vhost_target() -> Result<()> {
    if !guest_available(None)? {
        return Ok(());
    }
    let dir = scratch_dir()?;
    let image = prepare_image(dir.path())?;
    let server = Server::vhost_target(&image, dir.path())?;
    guest_reads_writes_flushes_and_discards(&server, &image, dir.path())
}

#[test]
fn guest_pattern_matches_awk_pattern_layout() {
    // The guest's awk builds sector i as "<tag>-<i:06>-" repeated and cut at 512 bytes.
    let p = pattern("guest", 1024);
    assert_eq!(p.len(), 1024);
    assert!(p.starts_with(b"guest-000000-guest-000000-"));
    assert!(p[512..].starts_with(b"guest-000001-"));
    // 13-byte unit: the sector ends with a partial unit.
    assert_eq!(&p[507..512], b"guest"[..5].as_ref());
}

mod common;
#[path = "../../replicator/tests/common/mod.rs"]
mod site;

/// The guest's side of the replicated-disk test: fio writes 16 MiB of 4 KiB random blocks
/// with crc32c verification (then reads and checks them all), and dd writes a known pattern
/// for the host to check after the guest is gone. The host kills the primary replicator
/// while fio runs.
const REPLICATED_SCRIPT: &str = r#"
set -u
dev=/dev/vda
echo "SIZE_SECTORS $(cat /sys/block/vda/size)"
fio --name=rep --filename=$dev --direct=1 --ioengine=libaio --iodepth=8 --rw=randwrite \
    --bs=4k --offset=0 --size=16M --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --eta=never >/tmp/fio.out 2>&1
rc=$?
echo "FIO_RC $rc"
[ "$rc" = 0 ] || tail -n 30 /tmp/fio.out
pat guest 2048 > /tmp/guest.pat
if dd if=/tmp/guest.pat of=$dev bs=4096 seek=6144 count=256 oflag=direct conv=fsync 2>/dev/null
then echo "PATTERN_WRITE ok"; else echo "PATTERN_WRITE failed"; fi
echo "KERNEL_IO_ERRORS $(dmesg | grep -c -i 'i/o error')"
echo "GUEST_DONE ok"
"#;

/// A guest writes and verifies a replicated disk while the primary replicator is killed with
/// SIGKILL: no I/O error in the guest, fio's verification passes, and a fresh attach of the
/// volume afterwards (a new target, the same key) reads back the pattern the guest wrote.
#[test]
fn guest_on_a_replicated_disk_survives_a_primary_kill9() -> Result<()> {
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;
    if !guest_available(Some("fio"))? {
        return Ok(());
    }
    let dir = scratch_dir()?;
    let au = site::TestAuthority::start();
    au.create_volume("vol-g", 64 << 20, &["s1", "s2"]);
    let s1 = site::ServerProc::start("s1", dir.path(), &au.addr, &["vol-g"], &[])?;
    let s2 = site::ServerProc::start("s2", dir.path(), &au.addr, &["vol-g"], &[])?;
    site::wait_in_sync(&au, &s1, "vol-g", &["s2"])?;
    let key = dir.path().join("vol-g.key");
    let hex: String = (0..64u8).map(|i| format!("{:02x}", i ^ 0xa5)).collect();
    std::fs::write(&key, hex)?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    let bdev = json!({"name": "Rep0", "authority": au.addr, "site": site::SITE,
                      "volume": "vol-g", "key_name": "k"});
    let t = common::Target::start();
    t.call("keyring_file_add_key", json!({"name": "k", "path": key}));
    t.call("bdev_replicated_create", bdev.clone());
    let sock = t.controller("vhost.g", "Rep0", json!({}));

    let s1 = std::sync::Mutex::new(s1);
    let (report, killed_after) = std::thread::scope(|sc| {
        let guest =
            sc.spawn(|| run_guest_with(dir.path(), &sock, &with_pat(REPLICATED_SCRIPT), true));
        // Kill the primary once fio is well under way (writes are reaching the target).
        let mut killed_after = None;
        while !guest.is_finished() {
            let writes = t.call("bdev_get_iostat", json!({"name": "Rep0"}))["bdevs"][0]
                ["num_write_ops"]
                .as_u64()
                .unwrap_or(0);
            if writes >= 800 {
                s1.lock().unwrap().kill9();
                killed_after = Some(writes);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (guest.join().expect("guest thread"), killed_after)
    });
    let report = report?;
    let killed_after = killed_after.context("the guest finished before the primary was killed")?;
    let get = |k: &str| report.get(k).map(String::as_str).unwrap_or("-");
    assert_eq!(get("GUEST_DONE"), "ok", "{report:?}");
    assert_eq!(
        get("FIO_RC"),
        "0",
        "fio with crc32c verification: {report:?}"
    );
    assert_eq!(get("PATTERN_WRITE"), "ok", "{report:?}");
    assert_eq!(
        get("KERNEL_IO_ERRORS"),
        "0",
        "I/O errors in the guest: {report:?}"
    );
    let st = &t.call("bdev_get_bdevs", json!({"name": "Rep0"}))[0]["driver_specific"]["replicated"];
    assert_eq!(st["primary"], "s2", "the survivor is primary: {st}");
    eprintln!("primary killed after {killed_after} guest writes; after the guest: {st}");
    drop(t);

    // A fresh attach reads what the guest wrote, from the surviving replica.
    let t2 = common::Target::start();
    t2.call("keyring_file_add_key", json!({"name": "k", "path": key}));
    t2.call("bdev_replicated_create", bdev);
    let mut s = vhost_target::loadgen::Session::connect(
        t2.controller("vhost.g", "Rep0", json!({})),
        vhost_target::loadgen::SessionOptions::default(),
    )?;
    let mut back = vec![0u8; 1 << 20];
    s.read(24 << 20, &mut back)?;
    assert!(
        back == pattern("guest", 1 << 20),
        "the surviving replica holds the guest's pattern"
    );
    drop(s2);
    Ok(())
}
