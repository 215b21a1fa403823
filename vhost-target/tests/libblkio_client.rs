//! A client built on libblkio (the `blkio` crate is libblkio's Rust core; fio's `libblkio`
//! engine, QEMU's `virtio-blk-vhost-user` blockdev and nbdkit's blkio plugin link the same
//! code) drives `vhost-target` through its `virtio-blk-vhost-user` driver. libblkio registers
//! its memory with ADD_MEM_REG after negotiating CONFIGURE_MEM_SLOTS, and sets up its own
//! queues: this is the check that such clients connect, not only QEMU.

mod common;

use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use common::Target;
use serde_json::json;

const DISK: u64 = 16 << 20;
const LEN: usize = 256 << 10;
const AT: u64 = 1 << 20;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed))
        .collect()
}

/// Waits for the one request in flight on `q` and returns its `ret` (0 or -errno).
fn complete(t: &Target, q: &mut Blkioq, user_data: usize) -> i32 {
    let mut done = [MaybeUninit::<Completion>::uninit()];
    let mut timeout = Duration::from_secs(10);
    let n = q
        .do_io(&mut done, 1, Some(&mut timeout), None)
        .expect("blkioq_do_io");
    assert_eq!(n, 1, "no completion within 10 s");
    // SAFETY: do_io initialised the first `n` (= 1) completions.
    let c = unsafe { done[0].assume_init_read() };
    assert_eq!(c.user_data, user_data);
    if c.ret != 0 {
        // The target's log says why (bad requests are logged with their reason).
        eprintln!("request {user_data} failed ({}):\n{}", c.ret, t.log());
    }
    c.ret
}

fn connect(sock: &Path, queues: i32) -> (Blkio, Vec<Blkioq>) {
    let mut b = Blkio::new("virtio-blk-vhost-user").expect("blkio_create");
    b.set_str("path", sock.to_str().unwrap()).unwrap();
    b.connect().expect("blkio_connect to vhost-target");
    b.set_i32("num-queues", queues).unwrap();
    let started = b.start().expect("blkio_start");
    (b, started.queues)
}

/// A region of libblkio-allocated (memfd) memory, mapped for the device.
fn region(b: &mut Blkio, len: usize) -> (MemoryRegion, &'static mut [u8]) {
    let r = b.alloc_mem_region(len).expect("alloc_mem_region");
    b.map_mem_region(&r).expect("map_mem_region (ADD_MEM_REG)");
    // SAFETY: libblkio mapped `r.len` bytes at `r.addr`; the region lives until the test ends
    // (it is never freed), and only this test touches it between requests.
    let buf = unsafe { std::slice::from_raw_parts_mut(r.addr as *mut u8, r.len) };
    (r, buf)
}

#[test]
fn libblkio_client_writes_reads_zeroes_flushes_and_reconnects() {
    let t = Target::start();
    let image = t.dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(DISK)
        .unwrap();
    t.call(
        "bdev_uring_create",
        json!({"name": "Uring0", "filename": image, "block_size": 512}),
    );
    let sock = t.controller("vhost.0", "Uring0", json!({"cpumask": "0x1"}));
    let file = std::fs::File::open(&image).unwrap();
    let data = pattern(LEN, 5);

    {
        let (mut b, mut queues) = connect(&sock, 2);
        assert_eq!(queues.len(), 2);
        assert_eq!(b.get_u64("capacity").unwrap(), DISK);
        let (_r, buf) = region(&mut b, 2 * LEN);
        let (wbuf, rbuf) = buf.split_at_mut(LEN);
        wbuf.copy_from_slice(&data);

        // A FUA write on queue 0, read back on queue 1.
        queues[0].write(AT, wbuf.as_ptr(), LEN, 1, ReqFlags::FUA);
        assert_eq!(complete(&t, &mut queues[0], 1), 0, "write failed");
        queues[1].read(AT, rbuf.as_mut_ptr(), LEN, 2, ReqFlags::empty());
        assert_eq!(complete(&t, &mut queues[1], 2), 0, "read failed");
        assert!(
            rbuf[..] == data[..],
            "read back differs from what was written"
        );
        let mut on_disk = vec![0u8; LEN];
        file.read_exact_at(&mut on_disk, AT).unwrap();
        assert!(
            on_disk == data,
            "backing file differs from the written data"
        );

        // WRITE_ZEROES over the first 64 KiB, then FLUSH.
        queues[0].write_zeroes(AT, 64 << 10, 3, ReqFlags::empty());
        assert_eq!(complete(&t, &mut queues[0], 3), 0, "write-zeroes failed");
        queues[0].flush(4, ReqFlags::empty());
        assert_eq!(complete(&t, &mut queues[0], 4), 0, "flush failed");
        file.read_exact_at(&mut on_disk, AT).unwrap();
        assert!(on_disk[..64 << 10].iter().all(|&b| b == 0));
        assert!(on_disk[64 << 10..] == data[64 << 10..]);

        // A read past the end of the disk is refused, and the queue serves on.
        queues[1].read(DISK, rbuf.as_mut_ptr(), 4096, 5, ReqFlags::empty());
        assert!(
            complete(&t, &mut queues[1], 5) < 0,
            "read past the end succeeded"
        );
        queues[1].read(AT, rbuf.as_mut_ptr(), 4096, 6, ReqFlags::empty());
        assert_eq!(complete(&t, &mut queues[1], 6), 0);
    }

    // The client went away; a new one on the same socket sees the same bytes.
    let (mut b, mut queues) = connect(&sock, 1);
    let (_r, buf) = region(&mut b, LEN);
    queues[0].read(AT, buf.as_mut_ptr(), LEN, 7, ReqFlags::empty());
    assert_eq!(
        complete(&t, &mut queues[0], 7),
        0,
        "read after reconnect failed"
    );
    assert!(buf[..64 << 10].iter().all(|&b| b == 0));
    assert!(buf[64 << 10..] == data[64 << 10..]);
}
