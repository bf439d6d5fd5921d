//! Whether the host gave this process's audio threads real-time
//! scheduling. Without it (no CAP_SYS_NICE, no RTKit, a container) the
//! graph runs the guest streams late under load and the guests glitch;
//! users should hear about it once, in the log, not only as clicks.

use std::sync::Once;

/// The scheduling policy of each thread of process `pid` ("self" for this
/// one) whose name starts with `prefix`: (name, policy name).
pub fn thread_policies(pid: &str, prefix: &str) -> Vec<(String, &'static str)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
        .filter_map(|stat| parse_stat(&stat))
        .filter(|(name, _)| name.starts_with(prefix))
        .map(|(name, policy)| (name, policy_name(policy)))
        .collect()
}

fn policy_name(policy: u32) -> &'static str {
    match policy as i32 {
        libc::SCHED_OTHER => "SCHED_OTHER",
        libc::SCHED_FIFO => "SCHED_FIFO",
        libc::SCHED_RR => "SCHED_RR",
        libc::SCHED_BATCH => "SCHED_BATCH",
        libc::SCHED_IDLE => "SCHED_IDLE",
        _ => "other",
    }
}

/// (comm, policy) from a `/proc/<pid>/task/<tid>/stat` line. The comm may
/// hold spaces and parentheses: it ends at the last ") ".
fn parse_stat(stat: &str) -> Option<(String, u32)> {
    let (head, rest) = stat.rsplit_once(") ")?;
    let comm = head.split_once(" (")?.1;
    // Field 41 (policy); `rest` starts at field 3.
    let policy = rest.split_whitespace().nth(38)?.parse().ok()?;
    Some((comm.to_owned(), policy))
}

fn is_realtime(policy: &str) -> bool {
    matches!(policy, "SCHED_FIFO" | "SCHED_RR")
}

/// Logs, once per process, when none of PipeWire's data threads runs with
/// real-time scheduling. Call from a non-real-time thread once a stream
/// runs (its data thread exists and has had its priority set by then).
pub fn warn_once_without_realtime() {
    static CHECKED: Once = Once::new();
    CHECKED.call_once(|| {
        let threads = thread_policies("self", "data-loop");
        if !threads.is_empty() && !threads.iter().any(|(_, p)| is_realtime(p)) {
            tracing::warn!(
                "PipeWire's data thread runs without real-time scheduling: under load the graph \
                 will run guest streams late (see late_cycles); give xen-vsnd CAP_SYS_NICE, an \
                 RLIMIT_RTPRIO or RTKit"
            );
        }
    });
}

/// Real-time priority for the calling thread's own audio loop (the ALSA
/// host's): below PipeWire's and JACK's, whose graphs it may feed.
const OWN_PRIORITY: i32 = 70;

/// Asks for real-time scheduling (SCHED_FIFO) for the calling thread, as
/// PipeWire and JACK do for theirs. Without the privilege it stays as it
/// is, and the log says so once.
pub fn raise_this_thread() -> bool {
    let param = libc::sched_param { sched_priority: OWN_PRIORITY };
    // SAFETY: the calling thread's own handle and a valid parameter.
    let r = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
    if r != 0 {
        static WARNED: Once = Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                "xen-vsnd's audio threads run without real-time scheduling ({}): under load \
                 guest streams will glitch (see late_cycles); give xen-vsnd CAP_SYS_NICE or an \
                 RLIMIT_RTPRIO",
                std::io::Error::from_raw_os_error(r)
            );
        });
    }
    r == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_policy_past_a_comm_with_spaces_and_parentheses() {
        let fields = (3..=52).map(|i| if i == 41 { "1".to_string() } else { i.to_string() });
        let rest = fields.collect::<Vec<_>>().join(" ");
        let stat = format!("1234 (data-loop) (x)) {rest}");
        assert_eq!(parse_stat(&stat), Some(("data-loop) (x)".to_string(), 1)));
        assert!(is_realtime(policy_name(1)) && is_realtime(policy_name(2)));
        assert!(!is_realtime(policy_name(0)));
    }

    #[test]
    fn this_test_thread_is_found_with_its_policy() {
        std::thread::Builder::new()
            .name("data-loop-test".into())
            .spawn(|| {
                let found = thread_policies("self", "data-loop-test");
                assert_eq!(found.len(), 1, "{found:?}");
                // SAFETY: no arguments but the calling thread's id (0).
                let policy = unsafe { libc::sched_getscheduler(0) };
                assert_eq!(found[0].1, policy_name(policy as u32));
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
