//! Fuzzes virtio-blk request parsing over descriptor chains walked by
//! virtio-queue (indirect tables, loops, wild addresses).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vhost_target::blk::fuzzing::fuzz_request(data);
});
