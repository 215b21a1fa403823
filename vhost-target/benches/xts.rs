//! What the replicated bdev's encryption costs per request: AES-256-XTS over a 4 KiB and a
//! 128 KiB write (encrypt) and read (decrypt, with the all-zero-sector check the read path
//! does), on one core. `docs/performance.md` compares it with the replicated throughput.
//!
//!   cargo bench -p vhost-target --bench xts

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use replicator::volume_key::VolumeKey;

fn key() -> VolumeKey {
    let bytes: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37) ^ 0x5c).collect();
    VolumeKey::from_bytes("bench", &bytes).expect("a valid key")
}

fn xts(c: &mut Criterion) {
    let k = key();
    let mut g = c.benchmark_group("xts");
    for size in [4096usize, 128 * 1024] {
        g.throughput(Throughput::Bytes(size as u64));
        let mut buf: Vec<u8> = (0..size).map(|i| (i * 31) as u8).collect();
        g.bench_with_input(BenchmarkId::new("encrypt", size), &size, |b, _| {
            b.iter(|| k.encrypt(&mut buf, 8).expect("whole sectors"))
        });
        g.bench_with_input(BenchmarkId::new("decrypt", size), &size, |b, _| {
            b.iter(|| {
                for (i, s) in buf.chunks_exact_mut(512).enumerate() {
                    if s.iter().any(|&x| x != 0) {
                        k.decrypt(s, 8 + i as u64).expect("one sector");
                    }
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, xts);
criterion_main!(benches);
