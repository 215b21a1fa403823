//! The load generator against Tandem's own `vhost-target` binary: the data path end to
//! end without a VM. The load generator plays the guest, including a malicious one.
//!
//! Covered here (issue 2): every class of bad request gets its virtio status, is counted in
//! `vhost_get_controllers`, and the queue keeps serving; an avail-ring head past the
//! descriptor table is consumed without breaking the queue; CONFIGURE_MEM_SLOTS
//! (ADD_MEM_REG, as libblkio clients register memory) with two regions; reconnect after a
//! frontend goes away; several controllers with their own bdevs, several queues each, in
//! every poll mode, driven concurrently with verified I/O; read-only controllers.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vhost_target::loadgen::{
    blk, features, run_job, LoadgenArgs, RawDesc, RwMode, Session, SessionOptions,
    VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};

mod common;
use common::{Target, BLOCKS};

fn opts() -> SessionOptions {
    SessionOptions {
        timeout: Duration::from_secs(10),
        ..SessionOptions::default()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A bad request and what the guest must see: `Some(status)`, or `None` when the chain
/// has no usable status byte (it is retired with used length 0 and the byte untouched).
struct BadCase {
    name: &'static str,
    expect: Option<u8>,
}

#[test]
fn every_bad_request_class_gets_its_status_is_counted_and_the_queue_serves_on() {
    let t = Target::start();
    t.malloc("Malloc0");
    let sock = t.controller("vhost.0", "Malloc0", json!({}));
    let mut s = Session::connect(&sock, opts()).unwrap();
    let data = pattern(4096, 9);
    s.write(8192, &data).unwrap();

    let capacity_sectors = BLOCKS;
    let mut q = s.raw_queue(0).unwrap();
    let outside = q.gpa_outside();
    let buf = q.alloc(4096, 0).unwrap();
    let r = VIRTQ_DESC_F_NEXT;
    let w = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE;
    let mut cases = Vec::new();
    // Each case: a request header type/sector and the chain after the header.
    let mut run_case = |q: &mut vhost_target::loadgen::RawQueue<'_>,
                        case: BadCase,
                        chain: &dyn Fn(u64, u64) -> Vec<RawDesc>,
                        req_type: u32,
                        sector: u64| {
        let hdr = q.alloc_header(req_type, sector).unwrap();
        let st = q.alloc_status().unwrap();
        let head = q.submit_chain(&chain(hdr, st)).unwrap();
        let (id, len) = q
            .wait_used(Duration::from_secs(10))
            .unwrap()
            .unwrap_or_else(|| panic!("{}: no completion", case.name));
        assert_eq!(id, u32::from(head), "{}: used id", case.name);
        match case.expect {
            Some(status) => {
                assert_eq!(q.read_status(st).unwrap(), status, "{}: status", case.name);
                assert!(len >= 1, "{}: used len {len} covers the status", case.name);
            }
            None => {
                assert_eq!(q.read_status(st).unwrap(), 0xff, "{}: untouched", case.name);
                assert_eq!(len, 0, "{}: used len", case.name);
            }
        }
        cases.push(case.name);
    };
    let d = |addr, len, flags, next| RawDesc {
        addr,
        len,
        flags,
        next,
    };
    let st_desc = |st| d(st, 1, VIRTQ_DESC_F_WRITE, 0);

    run_case(
        &mut q,
        BadCase {
            name: "data outside guest memory",
            expect: Some(blk::VIRTIO_BLK_S_IOERR),
        },
        &|h, st| vec![d(h, 16, r, 1), d(outside, 4096, w, 2), st_desc(st)],
        blk::VIRTIO_BLK_T_IN,
        0,
    );
    run_case(
        &mut q,
        BadCase {
            name: "header outside guest memory",
            expect: Some(blk::VIRTIO_BLK_S_IOERR),
        },
        &|_h, st| vec![d(outside, 16, r, 1), d(buf, 4096, w, 2), st_desc(st)],
        blk::VIRTIO_BLK_T_IN,
        0,
    );
    run_case(
        &mut q,
        BadCase {
            name: "chain loop",
            expect: None,
        },
        // The data descriptor points back at the header: the chain never ends.
        &|h, st| vec![d(h, 16, r, 1), d(buf, 4096, w, 0), st_desc(st)],
        blk::VIRTIO_BLK_T_IN,
        0,
    );
    run_case(
        &mut q,
        BadCase {
            name: "header shorter than 16 bytes",
            expect: Some(blk::VIRTIO_BLK_S_IOERR),
        },
        &|h, st| vec![d(h, 8, r, 1), d(buf, 4096, w, 2), st_desc(st)],
        blk::VIRTIO_BLK_T_IN,
        0,
    );
    run_case(
        &mut q,
        BadCase {
            name: "zero-length status descriptor",
            expect: None,
        },
        &|h, st| {
            vec![
                d(h, 16, r, 1),
                d(buf, 4096, w, 2),
                d(st, 0, VIRTQ_DESC_F_WRITE, 0),
            ]
        },
        blk::VIRTIO_BLK_T_IN,
        0,
    );
    run_case(
        &mut q,
        BadCase {
            name: "status descriptor not device-writable",
            expect: None,
        },
        &|h, st| vec![d(h, 16, r, 1), d(buf, 4096, w, 2), d(st, 1, 0, 0)],
        blk::VIRTIO_BLK_T_IN,
        0,
    );
    run_case(
        &mut q,
        BadCase {
            name: "read into a device-readable buffer",
            expect: Some(blk::VIRTIO_BLK_S_IOERR),
        },
        &|h, st| vec![d(h, 16, r, 1), d(buf, 4096, r, 2), st_desc(st)],
        blk::VIRTIO_BLK_T_IN,
        0,
    );
    run_case(
        &mut q,
        BadCase {
            name: "past the end of the disk",
            expect: Some(blk::VIRTIO_BLK_S_IOERR),
        },
        &|h, st| vec![d(h, 16, r, 1), d(buf, 4096, w, 2), st_desc(st)],
        blk::VIRTIO_BLK_T_IN,
        capacity_sectors - 4,
    );
    run_case(
        &mut q,
        BadCase {
            name: "zero-length data segment",
            expect: Some(blk::VIRTIO_BLK_S_IOERR),
        },
        &|h, st| vec![d(h, 16, r, 1), d(buf, 0, w, 2), st_desc(st)],
        blk::VIRTIO_BLK_T_IN,
        0,
    );
    run_case(
        &mut q,
        BadCase {
            name: "huge data segment",
            expect: Some(blk::VIRTIO_BLK_S_IOERR),
        },
        &|h, st| vec![d(h, 16, r, 1), d(buf, 0xffff_fe00, w, 2), st_desc(st)],
        blk::VIRTIO_BLK_T_IN,
        0,
    );
    run_case(
        &mut q,
        BadCase {
            name: "unknown request type",
            expect: Some(blk::VIRTIO_BLK_S_UNSUPP),
        },
        &|h, st| vec![d(h, 16, r, 1), st_desc(st)],
        0x7777,
        0,
    );

    // A head index past the descriptor table (a corrupted avail ring): nothing can be
    // returned for it, but it is counted and the queue must keep serving what follows.
    let size = q.ring().size();
    q.submit_head(size + 3).unwrap();
    let hdr = q.alloc_header(blk::VIRTIO_BLK_T_IN, 8192 / 512).unwrap();
    let st = q.alloc_status().unwrap();
    let head = q
        .submit_chain(&RawDesc::chain(&[
            (hdr, 16, 0),
            (buf, 4096, VIRTQ_DESC_F_WRITE),
            (st, 1, VIRTQ_DESC_F_WRITE),
        ]))
        .unwrap();
    let (id, _) = q
        .wait_used(Duration::from_secs(10))
        .unwrap()
        .expect("the queue stopped serving after an out-of-range head");
    assert_eq!(id, u32::from(head), "only the valid request is returned");
    assert_eq!(q.read_status(st).unwrap(), blk::VIRTIO_BLK_S_OK);
    let mut back = vec![0u8; 4096];
    q.mem().read(buf, &mut back).unwrap();
    assert_eq!(
        back, data,
        "the good read after the bad head returns the data"
    );
    drop(q);

    // The queue still serves ordinary I/O, and the daemon counted every bad request.
    let mut back = vec![0u8; 4096];
    s.read(8192, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(
        t.bad_requests("vhost.0"),
        cases.len() as u64 + 1,
        "{cases:?}"
    );
}

#[test]
fn mem_slots_two_regions_and_reconnect_reach_the_file() {
    let t = Target::start();
    let image = t.dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    t.call(
        "bdev_uring_create",
        json!({"name": "Uring0", "filename": image, "block_size": 512}),
    );
    let sock = t.controller("vhost.0", "Uring0", json!({}));
    let data = pattern(256 << 10, 3);
    {
        // ADD_MEM_REG per region, as libblkio-based clients register memory.
        let mut s = Session::connect(
            &sock,
            SessionOptions {
                mem_slots: true,
                regions: 2,
                ..opts()
            },
        )
        .unwrap();
        assert_eq!(s.capacity_bytes(), 16 << 20);
        // What a uring bdev's controller offers (issue 2's feature list).
        let offered = s.frontend().get_features().unwrap();
        for (name, bit) in [
            ("VERSION_1", features::VIRTIO_F_VERSION_1),
            ("RING_INDIRECT_DESC", features::VIRTIO_RING_F_INDIRECT_DESC),
            ("RING_EVENT_IDX", features::VIRTIO_RING_F_EVENT_IDX),
            ("BLK_SIZE", features::VIRTIO_BLK_F_BLK_SIZE),
            ("SEG_MAX", features::VIRTIO_BLK_F_SEG_MAX),
            ("SIZE_MAX", features::VIRTIO_BLK_F_SIZE_MAX),
            ("TOPOLOGY", features::VIRTIO_BLK_F_TOPOLOGY),
            ("FLUSH", features::VIRTIO_BLK_F_FLUSH),
            ("CONFIG_WCE", features::VIRTIO_BLK_F_CONFIG_WCE),
            ("DISCARD", features::VIRTIO_BLK_F_DISCARD),
            ("WRITE_ZEROES", features::VIRTIO_BLK_F_WRITE_ZEROES),
            ("MQ", features::VIRTIO_BLK_F_MQ),
        ] {
            assert_ne!(offered & bit, 0, "{name} not offered: {offered:#x}");
        }
        assert_eq!(
            offered & features::VIRTIO_BLK_F_RO,
            0,
            "RO on a writable controller"
        );
        let protocol = s.frontend().get_protocol_features().unwrap();
        let want = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        assert!(protocol.contains(want), "protocol features {protocol:?}");
        s.write(1 << 20, &data).unwrap();
        s.flush().unwrap();
    }
    let mut file = vec![0u8; data.len()];
    std::fs::File::open(&image)
        .unwrap()
        .read_exact_at(&mut file, 1 << 20)
        .unwrap();
    assert_eq!(file, data, "bytes in the backing file");
    // A second frontend on the same socket (SET_MEM_TABLE this time) after the first went.
    for _ in 0..2 {
        let mut s = Session::connect(&sock, opts()).unwrap();
        let mut back = vec![0u8; data.len()];
        s.read(1 << 20, &mut back).unwrap();
        assert_eq!(back, data, "read back after reconnect");
        s.discard(1 << 20, 4096).unwrap();
        let mut z = vec![1u8; 4096];
        s.read(1 << 20, &mut z).unwrap();
        assert!(z.iter().all(|&b| b == 0), "discarded range reads zeroes");
        s.write(1 << 20, &data[..4096]).unwrap();
    }
}

fn job(sock: &Path, poll: bool) -> LoadgenArgs {
    LoadgenArgs {
        socket: sock.to_owned(),
        rw: RwMode::Randrw,
        bs: 4096,
        iodepth: 8,
        queues: 2,
        cpus: None,
        runtime: Duration::from_secs(30),
        ios: Some(1500),
        size: Some(4 << 20),
        poll,
        rwmixread: 50,
        verify: true,
        queue_size: 64,
        mem_slots: false,
        regions: 1,
        no_event_idx: false,
        seed: 7,
        json: false,
    }
}

#[test]
fn several_controllers_with_two_queues_serve_verified_io_in_every_poll_mode() {
    let t = Target::start();
    let mut socks = Vec::new();
    for (i, mode) in ["poll", "interrupt", "adaptive"].iter().enumerate() {
        let bdev = format!("Malloc{i}");
        t.malloc(&bdev);
        let sock = t.controller(
            &format!("vhost.{mode}"),
            &bdev,
            json!({"poll_mode": mode, "num_queues": 2, "cpumask": "0x1"}),
        );
        socks.push((mode.to_string(), sock));
    }
    // Drive all three at once; the interrupt-mode controller with a sleeping frontend
    // (call eventfds, EVENT_IDX), the adaptive one without EVENT_IDX.
    let reports: Vec<_> = std::thread::scope(|sc| {
        let handles: Vec<_> = socks
            .iter()
            .map(|(mode, sock)| {
                let mut a = job(sock, mode == "poll");
                a.no_event_idx = mode == "adaptive";
                sc.spawn(move || (mode.clone(), run_job(&a)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (mode, r) in reports {
        let r = r.unwrap_or_else(|e| panic!("{mode}: {e:#}\n{}", t.log()));
        assert_eq!(r.queues, 2, "{mode}: {r:?}");
        assert_eq!(r.ios, 2 * 1500, "{mode}: {r:?}");
        assert_eq!((r.errors, r.verify_failures), (0, 0), "{mode}: {r:?}");
    }
    // Each controller has its own bdev: the serial is the bdev's name.
    for (i, (_, sock)) in socks.iter().enumerate() {
        let mut s = Session::connect(sock, opts()).unwrap();
        assert_eq!(s.get_id().unwrap(), format!("Malloc{i}"));
    }
}

#[test]
fn read_only_controller_offers_ro_and_refuses_writes() {
    let t = Target::start();
    t.malloc("Malloc0");
    let sock = t.controller("vhost.ro", "Malloc0", json!({"readonly": true}));
    let mut s = Session::connect(&sock, opts()).unwrap();
    assert_ne!(s.features() & features::VIRTIO_BLK_F_RO, 0, "RO offered");
    let mut buf = vec![0u8; 4096];
    s.read(0, &mut buf).unwrap();
    let e = s.write(0, &buf).unwrap_err();
    assert!(
        matches!(
            e,
            vhost_target::loadgen::LoadgenError::Status(blk::VIRTIO_BLK_S_IOERR)
        ),
        "{e}"
    );
    assert_eq!(t.bad_requests("vhost.ro"), 1);
    s.read(0, &mut buf).unwrap();
}
