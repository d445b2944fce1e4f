//! CPU time and resident memory of a process tree, from /proc (Linux).

use std::collections::HashMap;
use std::fs;

/// The process and all its descendants (nginx: master and workers).
pub fn tree(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1).and_then(|s| s.parse().ok()))
            {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut all = vec![root];
    let mut i = 0;
    while i < all.len() {
        if let Some(kids) = children.get(&all[i]) {
            all.extend(kids.iter().copied().filter(|k| *k != root));
        }
        i += 1;
    }
    all
}

/// The fields of /proc/PID/stat after the command name: index 0 is the state, 1 the
/// parent pid, 11 utime, 12 stime (fields 3, 4, 14 and 15 of proc(5)).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// CPU time of processes in clock ticks, split as the kernel accounts it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTicks {
    /// Time in user space (utime).
    pub user: u64,
    /// Time in the kernel on the processes' behalf (stime): system calls, and the
    /// loopback TCP work they do inline.
    pub system: u64,
}

impl CpuTicks {
    pub fn total(self) -> u64 {
        self.user + self.system
    }

    /// The ticks spent since `earlier`.
    pub fn since(self, earlier: CpuTicks) -> CpuTicks {
        CpuTicks {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

/// utime and stime of the processes (all threads of each process).
pub fn cpu_ticks(pids: &[u32]) -> CpuTicks {
    pids.iter()
        .filter_map(|&pid| {
            let f = stat_fields(pid)?;
            Some(CpuTicks {
                user: f.get(11)?.parse().ok()?,
                system: f.get(12)?.parse().ok()?,
            })
        })
        .fold(CpuTicks::default(), |a, b| CpuTicks {
            user: a.user + b.user,
            system: a.system + b.system,
        })
}

/// Sum of VmRSS of the processes, KiB.
pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|&pid| {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum()
}

/// Clock ticks per second (USER_HZ), from `getconf CLK_TCK`; 100 on every mainstream
/// Linux.
pub fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// The kernel's count of connection attempts dropped because a listen queue was full
/// (`TcpExt: ListenOverflows` of /proc/net/netstat; system-wide).
pub fn listen_overflows() -> Option<u64> {
    let text = fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines();
    while let Some(names) = lines.next() {
        let values = lines.next()?;
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let i = names
            .split_whitespace()
            .position(|n| n == "ListenOverflows")?;
        return values.split_whitespace().nth(i)?.parse().ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_split_user_and_kernel() {
        let before = CpuTicks {
            user: 10,
            system: 30,
        };
        let after = CpuTicks {
            user: 14,
            system: 45,
        };
        let spent = after.since(before);
        assert_eq!(
            spent,
            CpuTicks {
                user: 4,
                system: 15
            }
        );
        assert_eq!(spent.total(), 19);
        // A process that exited between the samples cannot make time negative.
        assert_eq!(before.since(after), CpuTicks::default());
    }

    #[test]
    fn this_process_has_cpu_time_in_both_parts() {
        // Spin (bounded) until the kernel has charged at least one tick of each kind
        // to this process: user time for the loop, system time for the /proc reads.
        let me = std::process::id();
        let began = std::time::Instant::now();
        let mut ticks = cpu_ticks(&[me]);
        while !(ticks.user > 0 && ticks.system > 0)
            && began.elapsed() < std::time::Duration::from_secs(10)
        {
            ticks = cpu_ticks(&[me]);
        }
        assert!(ticks.user > 0 && ticks.system > 0, "{ticks:?}");
    }
}
