//! The channel of bdevs that finish a request inside `submit` (null, malloc).
//!
//! The contract of [`IoChannel`] is asynchronous: results come back through
//! `poll`, never from `submit`, so the virtio layer has one completion path
//! for every bdev. A synchronous bdev does the work in `submit` and parks the
//! result in a fixed-capacity ring until the next `poll`.

use super::params::IoBounds;
use super::{BdevIo, Completion, IoChannel, IoError, SubmitError};

/// The work of a synchronous bdev on one channel.
pub trait SyncExecutor: Send {
    /// Checks that go beyond [`IoBounds`] (e.g. that the iovecs add up to
    /// `io.len`); a failure refuses the request before anything is touched.
    ///
    /// # Safety
    /// As [`IoChannel::submit`].
    unsafe fn validate(&self, io: &BdevIo) -> Result<(), IoError> {
        let _ = io;
        Ok(())
    }

    /// Carries out a request that passed every check.
    ///
    /// # Safety
    /// As [`IoChannel::submit`], and `io` passed [`IoBounds::check`] and
    /// [`SyncExecutor::validate`].
    unsafe fn execute(&mut self, io: &BdevIo) -> Result<(), IoError>;
}

/// A FIFO of finished requests with room for exactly `queue_depth` entries,
/// allocated once when the channel opens.
#[derive(Debug)]
pub struct CompletionRing {
    slots: Box<[Completion]>,
    head: usize,
    len: usize,
}

impl CompletionRing {
    pub fn with_capacity(capacity: usize) -> Self {
        assert!(capacity > 0, "a completion ring needs room for one entry");
        let empty = Completion {
            tag: 0,
            result: Ok(()),
        };
        Self {
            slots: vec![empty; capacity].into_boxed_slice(),
            head: 0,
            len: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == self.slots.len()
    }

    /// Appends `c`; the caller checked `!is_full()` (the queue-depth limit).
    #[inline]
    pub fn push(&mut self, c: Completion) {
        assert!(!self.is_full(), "completion ring overflow");
        let mut tail = self.head + self.len;
        if tail >= self.slots.len() {
            tail -= self.slots.len();
        }
        self.slots[tail] = c;
        self.len += 1;
    }

    #[inline]
    pub fn pop(&mut self) -> Option<Completion> {
        if self.is_empty() {
            return None;
        }
        let c = self.slots[self.head];
        self.head += 1;
        if self.head == self.slots.len() {
            self.head = 0;
        }
        self.len -= 1;
        Some(c)
    }
}

/// An [`IoChannel`] over a [`SyncExecutor`].
pub struct SyncChannel<E> {
    exec: E,
    bounds: IoBounds,
    done: CompletionRing,
}

impl<E: SyncExecutor> SyncChannel<E> {
    pub fn new(exec: E, bounds: IoBounds, queue_depth: u32) -> Self {
        Self {
            exec,
            bounds,
            done: CompletionRing::with_capacity(queue_depth as usize),
        }
    }
}

impl<E: SyncExecutor> IoChannel for SyncChannel<E> {
    fn queue_depth(&self) -> u32 {
        self.done.capacity() as u32
    }

    unsafe fn submit(&mut self, io: &BdevIo) -> Result<(), SubmitError> {
        // A finished request still counts as in flight until `poll` hands it
        // over, so the ring can never overflow.
        if self.done.is_full() {
            return Err(SubmitError::Busy);
        }
        self.bounds.check(io).map_err(SubmitError::Refused)?;
        // SAFETY: our caller upholds the submit contract, which is the
        // contract of `validate`.
        unsafe { self.exec.validate(io) }.map_err(SubmitError::Refused)?;
        // SAFETY: the submit contract holds, and `io` passed both checks.
        let result = unsafe { self.exec.execute(io) };
        self.done.push(Completion {
            tag: io.tag,
            result,
        });
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(Completion)) -> usize {
        let mut n = 0;
        while let Some(c) = self.done.pop() {
            done(c);
            n += 1;
        }
        n
    }

    fn in_flight(&self) -> u32 {
        self.done.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_ring_is_fifo_across_wraparound() {
        let mut r = CompletionRing::with_capacity(3);
        for round in 0..5u32 {
            for i in 0..3 {
                r.push(Completion {
                    tag: round * 10 + i,
                    result: Ok(()),
                });
            }
            assert!(r.is_full());
            for i in 0..3 {
                assert_eq!(r.pop().unwrap().tag, round * 10 + i);
            }
            assert!(r.pop().is_none());
            // Shift the head so the next round wraps.
            r.push(Completion {
                tag: 99,
                result: Ok(()),
            });
            assert_eq!(r.pop().unwrap().tag, 99);
        }
    }
}
