//! The load generator against qemu-storage-daemon's vhost-user-blk export: proves the
//! frontend speaks vhost-user correctly to a backend we did not write.
//!
//! Skipped (with a message) when `qemu-storage-daemon` is not on PATH, unless
//! `TANDEM_REQUIRE_QSD=1`, which turns the skip into a failure (for CI).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhost_target::loadgen::{
    blk, run_job, LoadgenArgs, RawDesc, RwMode, Session, SessionOptions, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
};

const DISK: u64 = 64 << 20;

/// A qemu-storage-daemon child, killed on drop.
struct Qsd {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
    image: PathBuf,
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qsd_available() -> bool {
    let found = Command::new("qemu-storage-daemon")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var("TANDEM_REQUIRE_QSD").as_deref() == Ok("1") {
            panic!("qemu-storage-daemon not on PATH and TANDEM_REQUIRE_QSD=1");
        }
        eprintln!("SKIP: qemu-storage-daemon not on PATH");
    }
    found
}

/// Starts qsd exporting a fresh 64 MiB file (O_DIRECT off so the test can read the file
/// back through the page cache coherently).
fn start_qsd(queues: u32) -> Qsd {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(DISK)
        .unwrap();
    let sock = dir.path().join("qsd.sock");
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={},discard=unmap",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
            sock.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut q = Qsd {
        child,
        sock,
        _dir: dir,
        image,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !q.sock.exists() {
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon did not create its socket"
        );
        if let Some(st) = q.child.try_wait().unwrap() {
            panic!("qemu-storage-daemon exited: {st}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    q
}

fn opts() -> SessionOptions {
    SessionOptions {
        timeout: Duration::from_secs(5),
        ..SessionOptions::default()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn check_write_read_and_file(s: &mut Session, image: &Path) {
    let data = pattern(64 << 10, 7);
    let off = 3 << 20;
    s.write(off, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    s.read(off, &mut back).unwrap();
    assert_eq!(back, data, "read back through the device");
    s.flush().unwrap();
    let mut file = vec![0u8; data.len()];
    std::fs::File::open(image)
        .unwrap()
        .read_exact_at(&mut file, off)
        .unwrap();
    assert_eq!(file, data, "bytes in the exported file");
}

#[test]
fn write_read_flush_and_get_id_reach_the_file() {
    if !qsd_available() {
        return;
    }
    let qsd = start_qsd(1);
    let mut s = Session::connect(&qsd.sock, opts()).unwrap();
    assert_eq!(s.capacity_bytes(), DISK);
    check_write_read_and_file(&mut s, &qsd.image);
    // Larger than the bounce buffer: exercises splitting.
    let big = pattern(3 << 20, 1);
    s.write(8 << 20, &big).unwrap();
    let mut back = vec![0u8; big.len()];
    s.read(8 << 20, &mut back).unwrap();
    assert_eq!(back, big);
    // qsd answers GET_ID with its node name or export id; any answer that is OK will do.
    let id = s.get_id().unwrap();
    eprintln!("GET_ID -> {id:?}");
    // Write zeroes clears what was written.
    s.write_zeroes(3 << 20, 4096, false).unwrap();
    let mut z = vec![1u8; 4096];
    s.read(3 << 20, &mut z).unwrap();
    assert!(z.iter().all(|&b| b == 0));
}

#[test]
fn mem_slots_mode_and_two_regions_work() {
    if !qsd_available() {
        return;
    }
    let qsd = start_qsd(1);
    let mut s = Session::connect(
        &qsd.sock,
        SessionOptions {
            mem_slots: true,
            regions: 2,
            ..opts()
        },
    )
    .unwrap();
    check_write_read_and_file(&mut s, &qsd.image);
}

#[test]
fn raw_chain_straddling_regions_and_raw_status_readback() {
    if !qsd_available() {
        return;
    }
    let qsd = start_qsd(1);
    let mut s = Session::connect(
        &qsd.sock,
        SessionOptions {
            regions: 2,
            ..opts()
        },
    )
    .unwrap();
    let data = pattern(8192, 3);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&qsd.image)
        .unwrap()
        .write_all_at(&data, 1 << 20)
        .unwrap();
    let mut q = s.raw_queue(0).unwrap();
    let hdr = q
        .alloc_header(blk::VIRTIO_BLK_T_IN, (1 << 20) / 512)
        .unwrap();
    let st = q.alloc_status().unwrap();
    // Half the buffer in each region: the backend must split the mapping.
    let buf = q.mem().straddling(1, 4096, 8192).unwrap();
    let head = q
        .submit_chain(&[
            RawDesc {
                addr: hdr,
                len: 16,
                flags: VIRTQ_DESC_F_NEXT,
                next: 1,
            },
            RawDesc {
                addr: buf,
                len: 8192,
                flags: VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
                next: 2,
            },
            RawDesc {
                addr: st,
                len: 1,
                flags: VIRTQ_DESC_F_WRITE,
                next: 0,
            },
        ])
        .unwrap();
    let (id, _len) = q
        .wait_used(Duration::from_secs(5))
        .unwrap()
        .expect("completion");
    assert_eq!(id, u32::from(head));
    assert_eq!(q.read_status(st).unwrap(), blk::VIRTIO_BLK_S_OK);
    let mut back = vec![0u8; 8192];
    q.mem().read(buf, &mut back).unwrap();
    assert_eq!(back, data);

    // An unknown request type gets UNSUPP and the queue keeps serving.
    let hdr = q.alloc_header(0x7777, 0).unwrap();
    let st = q.alloc_status().unwrap();
    let head = q
        .submit_chain(&[
            RawDesc {
                addr: hdr,
                len: 16,
                flags: VIRTQ_DESC_F_NEXT,
                next: 1,
            },
            RawDesc {
                addr: st,
                len: 1,
                flags: VIRTQ_DESC_F_WRITE,
                next: 0,
            },
        ])
        .unwrap();
    let (id, _) = q
        .wait_used(Duration::from_secs(5))
        .unwrap()
        .expect("completion");
    assert_eq!(id, u32::from(head));
    assert_eq!(q.read_status(st).unwrap(), blk::VIRTIO_BLK_S_UNSUPP);
    drop(q);
    let mut z = vec![0u8; 512];
    s.read(0, &mut z).unwrap();
}

fn args(sock: &Path, rw: RwMode) -> LoadgenArgs {
    LoadgenArgs {
        socket: sock.to_owned(),
        rw,
        bs: 4096,
        iodepth: 8,
        queues: 1,
        cpus: None,
        runtime: Duration::from_millis(500),
        ios: None,
        size: None,
        poll: true,
        rwmixread: 50,
        verify: false,
        queue_size: 64,
        mem_slots: false,
        regions: 1,
        no_event_idx: false,
        seed: 1,
        json: false,
    }
}

#[test]
fn short_randread_run_reports_iops_and_no_errors() {
    if !qsd_available() {
        return;
    }
    let qsd = start_qsd(2);
    let r = run_job(&args(&qsd.sock, RwMode::Randread)).unwrap();
    assert!(r.iops > 0.0 && r.ios > 0, "{r:?}");
    assert_eq!(r.errors, 0);
    // Two queues, interrupt mode, no EVENT_IDX.
    let r = run_job(&LoadgenArgs {
        queues: 2,
        poll: false,
        no_event_idx: true,
        ..args(&qsd.sock, RwMode::Randread)
    })
    .unwrap();
    assert!(r.ios > 0, "{r:?}");
    assert_eq!(r.errors, 0);
}

#[test]
fn verified_random_writes_read_back() {
    if !qsd_available() {
        return;
    }
    let qsd = start_qsd(2);
    for (rw, mem_slots) in [(RwMode::Randwrite, false), (RwMode::Randrw, true)] {
        let r = run_job(&LoadgenArgs {
            queues: 2,
            verify: true,
            mem_slots,
            size: Some(4 << 20),
            ios: Some(2000),
            runtime: Duration::from_secs(20),
            ..args(&qsd.sock, rw)
        })
        .unwrap();
        assert!(r.ios > 0, "{r:?}");
        eprintln!("{r:?}");
        assert_eq!((r.errors, r.verify_failures), (0, 0), "{r:?}");
    }
}

#[test]
fn ring_indices_wrap_past_65535_with_the_backend() {
    if !qsd_available() {
        return;
    }
    let qsd = start_qsd(1);
    for event_idx in [true, false] {
        let mut s = Session::connect(
            &qsd.sock,
            SessionOptions {
                vring_base: 0xff80,
                queue_size: 64,
                event_idx,
                ..opts()
            },
        )
        .unwrap();
        // 300 requests from 0xff80: the avail and used indices cross 65535 -> 0.
        for i in 0..150u64 {
            let data = pattern(4096, i as u8);
            s.write(i * 4096, &data).unwrap();
            let mut back = vec![0u8; 4096];
            s.read(i * 4096, &mut back).unwrap();
            assert_eq!(back, data, "request {i}");
        }
    }
}

#[test]
fn raw_chain_helper_builds_a_valid_request() {
    if !qsd_available() {
        return;
    }
    let qsd = start_qsd(1);
    let mut s = Session::connect(&qsd.sock, opts()).unwrap();
    let mut q = s.raw_queue(0).unwrap();
    let hdr = q.alloc_header(blk::VIRTIO_BLK_T_GET_ID, 0).unwrap();
    let id = q.alloc(20, 0).unwrap();
    let st = q.alloc_status().unwrap();
    let chain = RawDesc::chain(&[
        (hdr, 16, 0),
        (id, 20, VIRTQ_DESC_F_WRITE),
        (st, 1, VIRTQ_DESC_F_WRITE),
    ]);
    let head = q.submit_chain(&chain).unwrap();
    let (got, _) = q
        .wait_used(Duration::from_secs(5))
        .unwrap()
        .expect("completion");
    assert_eq!(got, u32::from(head));
    assert_eq!(q.read_status(st).unwrap(), blk::VIRTIO_BLK_S_OK);
}
