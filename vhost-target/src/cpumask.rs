//! CPU masks with SPDK's meaning: a hex mask ("0x3", "3") or a list
//! ("[0,2-3]"); bit N is CPU N. Used for `-m` and for a controller's `cpumask`.

use std::fmt;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuMaskError {
    #[error("invalid cpumask {0:?}: expected a hex mask like 0x3 or a list like [0,2-3]")]
    Syntax(String),
    #[error("cpumask {0:?} selects no CPU")]
    Empty(String),
    #[error("cpumask {0:?} names CPU {1}, above the supported {max}", max = MAX_CPUS - 1)]
    TooLarge(String, usize),
}

pub const MAX_CPUS: usize = 1024;

/// A set of CPU numbers, kept sorted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CpuSet(Vec<usize>);

impl CpuSet {
    pub fn parse(s: &str) -> Result<Self, CpuMaskError> {
        let t = s.trim();
        let mut cpus = Vec::new();
        if let Some(list) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (lo, hi) = match part.split_once('-') {
                    Some((a, b)) => (a.trim(), b.trim()),
                    None => (part, part),
                };
                let lo: usize = lo.parse().map_err(|_| CpuMaskError::Syntax(s.into()))?;
                let hi: usize = hi.parse().map_err(|_| CpuMaskError::Syntax(s.into()))?;
                if lo > hi {
                    return Err(CpuMaskError::Syntax(s.into()));
                }
                if hi >= MAX_CPUS {
                    return Err(CpuMaskError::TooLarge(s.into(), hi));
                }
                cpus.extend(lo..=hi);
            }
        } else {
            let hex = t
                .strip_prefix("0x")
                .or_else(|| t.strip_prefix("0X"))
                .unwrap_or(t);
            if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(CpuMaskError::Syntax(s.into()));
            }
            for (i, c) in hex.chars().rev().enumerate() {
                let nibble = c.to_digit(16).unwrap_or(0) as usize;
                for bit in 0..4 {
                    if nibble & (1 << bit) != 0 {
                        let cpu = i * 4 + bit;
                        if cpu >= MAX_CPUS {
                            return Err(CpuMaskError::TooLarge(s.into(), cpu));
                        }
                        cpus.push(cpu);
                    }
                }
            }
        }
        cpus.sort_unstable();
        cpus.dedup();
        if cpus.is_empty() {
            return Err(CpuMaskError::Empty(s.into()));
        }
        Ok(CpuSet(cpus))
    }

    /// Every CPU this process may run on.
    pub fn online() -> Self {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        CpuSet((0..n).collect())
    }

    pub fn cpus(&self) -> &[usize] {
        &self.0
    }

    pub fn is_subset_of(&self, other: &CpuSet) -> bool {
        self.0.iter().all(|c| other.0.contains(c))
    }

    /// Pins the calling thread to one CPU. Failure is reported, not fatal:
    /// a container may forbid affinity changes, and the thread still works.
    pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
        // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: cpu < MAX_CPUS <= CPU_SETSIZE, checked at parse time.
        unsafe { libc::CPU_SET(cpu, &mut set) };
        // SAFETY: set is a valid cpu_set_t of the size passed; 0 means this thread.
        let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

impl fmt::Display for CpuSet {
    /// SPDK prints masks as hex ("0x3").
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let top = self.0.last().copied().unwrap_or(0);
        let mut nibbles = vec![0u8; top / 4 + 1];
        for &c in &self.0 {
            nibbles[c / 4] |= 1 << (c % 4);
        }
        write!(f, "0x")?;
        for n in nibbles.iter().rev() {
            write!(f, "{n:x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_list_forms_agree() {
        assert_eq!(CpuSet::parse("0x5").unwrap().cpus(), &[0, 2]);
        assert_eq!(CpuSet::parse("5").unwrap().cpus(), &[0, 2]);
        assert_eq!(CpuSet::parse("[0,2]").unwrap(), CpuSet::parse("0x5").unwrap());
        assert_eq!(CpuSet::parse("[1-3]").unwrap().cpus(), &[1, 2, 3]);
        assert_eq!(CpuSet::parse("0x30").unwrap().to_string(), "0x30");
    }

    #[test]
    fn bad_masks_are_errors() {
        assert!(matches!(CpuSet::parse("0x0"), Err(CpuMaskError::Empty(_))));
        assert!(matches!(CpuSet::parse("zz"), Err(CpuMaskError::Syntax(_))));
        assert!(matches!(CpuSet::parse("[3-1]"), Err(CpuMaskError::Syntax(_))));
        assert!(matches!(CpuSet::parse("[5000]"), Err(CpuMaskError::TooLarge(..))));
        assert!(matches!(CpuSet::parse(""), Err(CpuMaskError::Syntax(_))));
    }
}
