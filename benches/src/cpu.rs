//! Where CPU time went during a cell: this process (load generator and
//! anything served in process), the Redis server, other processes on the
//! machine, and time the hypervisor stole. On a shared machine the last two
//! say whether a cell was disturbed.
//!
//! Linux only (`/proc`); elsewhere the process, other and steal figures are NaN.

use std::time::Instant;

use crate::report::median;

/// Linux's USER_HZ (ticks per second in `/proc/*/stat`) on every
/// mainstream architecture.
const TICKS_PER_SEC: f64 = 100.0;

/// Counters read at one instant.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuSnapshot {
    at: Instant,
    process: Option<f64>,
    machine: Option<MachineCpu>,
    redis: f64,
    /// Whether Redis runs on this machine (then its time is not "other").
    redis_here: bool,
}

impl CpuSnapshot {
    /// Reads the counters; `redis` is the server's own CPU seconds
    /// (`INFO cpu`), `redis_here` whether it runs on this machine.
    pub(crate) fn now(redis: f64, redis_here: bool) -> Self {
        Self {
            at: Instant::now(),
            process: read("/proc/self/stat").and_then(|s| parse_process(&s)),
            machine: read("/proc/stat").and_then(|s| parse_machine(&s)),
            redis,
            redis_here,
        }
    }

    /// What was used between `before` and this snapshot.
    pub(crate) fn since(&self, before: &CpuSnapshot) -> CpuUse {
        let wall = (self.at - before.at).as_secs_f64();
        let process = match (before.process, self.process) {
            (Some(a), Some(b)) => b - a,
            _ => f64::NAN,
        };
        let redis = self.redis - before.redis;
        let (others, steal) = match (before.machine, self.machine) {
            (Some(a), Some(b)) => {
                let ours = process + if self.redis_here { redis } else { 0.0 };
                ((b.tasks - a.tasks - ours).max(0.0), b.steal - a.steal)
            }
            _ => (f64::NAN, f64::NAN),
        };
        CpuUse {
            wall,
            process,
            redis,
            others,
            steal,
        }
    }
}

/// CPU seconds used over a wall-clock interval.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuUse {
    /// The interval, in seconds.
    pub(crate) wall: f64,
    /// This process, user + system.
    pub(crate) process: f64,
    /// The Redis server, user + system.
    pub(crate) redis: f64,
    /// Every other task on the machine, user + system (not interrupts).
    pub(crate) others: f64,
    /// Time the hypervisor ran something else on this machine's CPUs.
    pub(crate) steal: f64,
}

impl CpuUse {
    /// CPUs' worth of work other processes did meanwhile (1.0 = one CPU busy).
    pub(crate) fn others_load(&self) -> f64 {
        self.others / self.wall
    }

    /// CPUs' worth of time stolen by the hypervisor.
    pub(crate) fn steal_load(&self) -> f64 {
        self.steal / self.wall
    }
}

/// Other processes' load (in CPUs) above which a cell counts as disturbed.
const DISTURBED: f64 = 0.1;

/// One report line: how busy the rest of the machine was during `cells`.
pub(crate) fn disturbance(cells: &[CpuUse]) -> String {
    let loads = |f: fn(&CpuUse) -> f64| {
        let values: Vec<f64> = cells.iter().map(f).collect();
        let most = values.iter().copied().fold(f64::NAN, f64::max);
        (median(&values).unwrap_or(f64::NAN), most)
    };
    let (others, others_most) = loads(CpuUse::others_load);
    let (steal, steal_most) = loads(CpuUse::steal_load);
    let busy = cells.iter().filter(|c| c.others_load() > DISTURBED).count();
    format!(
        "other load during the cells, in CPUs (other processes / hypervisor steal): median {others:.2} / {steal:.2}, \
         most {others_most:.2} / {steal_most:.2}; {busy} of {} cells had other processes above {DISTURBED:.2} CPU",
        cells.len()
    )
}

/// The machine-wide counters of `/proc/stat`, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
struct MachineCpu {
    /// user + nice + system: time spent running tasks.
    tasks: f64,
    steal: f64,
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// `utime + stime` (fields 14 and 15) of a `/proc/<pid>/stat` line, in seconds.
fn parse_process(stat: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces; it ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_SEC)
}

/// The `cpu` line of `/proc/stat`: user nice system idle iowait irq softirq steal ...
fn parse_machine(stat: &str) -> Option<MachineCpu> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|n| n.parse().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| ticks.get(i).copied().map(|t| t as f64 / TICKS_PER_SEC);
    Some(MachineCpu {
        tasks: at(0)? + at(1)? + at(2)?,
        steal: at(7).unwrap_or(0.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_process_and_machine_counters() {
        let line = "42 (my (odd) name) S 1 42 42 0 -1 4194560 100 0 0 0 250 150 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_process(line), Some(4.0));
        assert_eq!(parse_process("garbage"), None);
        let stat = "cpu  300 0 100 2000 10 0 30 5 0 0\ncpu0 150 0 50 1000 5 0 15 2 0 0\n";
        assert_eq!(
            parse_machine(stat),
            Some(MachineCpu {
                tasks: 4.0,
                steal: 0.05
            })
        );
    }

    #[test]
    fn others_are_what_is_left() {
        let before = CpuSnapshot {
            at: Instant::now(),
            process: Some(1.0),
            machine: Some(MachineCpu {
                tasks: 10.0,
                steal: 0.0,
            }),
            redis: 2.0,
            redis_here: true,
        };
        let after = CpuSnapshot {
            at: before.at + std::time::Duration::from_secs(2),
            process: Some(2.5),
            machine: Some(MachineCpu {
                tasks: 13.0,
                steal: 0.2,
            }),
            redis: 2.5,
            ..before
        };
        let used = after.since(&before);
        assert!((used.others - 1.0).abs() < 1e-9, "{used:?}");
        assert!((used.others_load() - 0.5).abs() < 1e-9);
        assert!((used.steal_load() - 0.1).abs() < 1e-9);
    }
}
