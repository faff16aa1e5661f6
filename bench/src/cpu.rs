//! CPU time spent by this process and by the RabbitMQ broker over a measured stretch, from
//! `/proc` (Linux). The router and the broker share the machine's cores, so a ratio of rates
//! alone hides where the time goes: the CPU per event of each side shows it, and the context
//! switches per event of this process's threads show how much of it is threads waking each
//! other.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A drain's rate and what it cost.
pub struct Drained {
    /// Events per second.
    pub rate: f64,
    pub cpu: CpuPerEvent,
}

impl Drained {
    /// `events` drained since `started`, with CPU counted since `cpu`.
    pub fn of(events: usize, started: Instant, cpu: &CpuClock) -> Drained {
        Drained { rate: rate(events, started), cpu: cpu.per_event(events) }
    }
}

/// Events per second since `started`; NaN when there were none to time (`--smoke`'s few
/// events can all be drained before the clock starts).
pub fn rate(events: usize, started: Instant) -> f64 {
    if events == 0 { f64::NAN } else { events as f64 / started.elapsed().as_secs_f64() }
}

/// Linux reports `utime` and `stime` in `USER_HZ` ticks, 100 per second on every architecture
/// Linux supports (it is part of the kernel's ABI, unlike `HZ`).
const USER_HZ: f64 = 100.0;

/// CPU time used so far by this process (in all, and by thread name) and by the broker.
pub struct CpuClock {
    own: Option<Times>,
    threads: BTreeMap<String, Thread>,
    broker: Option<(String, Times)>,
}

/// A process's or a thread's CPU time so far, in user space and in the kernel (system calls,
/// the network stack, waking and switching threads).
#[derive(Clone, Copy)]
struct Times {
    user: Duration,
    system: Duration,
}

impl Times {
    fn total(self) -> Duration {
        self.user + self.system
    }
}

/// CPU time used since a [`CpuClock`] was read, per event.
pub struct CpuPerEvent {
    /// Microseconds of this process (the bare consumer, or the router hosted in it).
    pub own_us: f64,
    /// Of them, in the kernel.
    pub own_system_us: f64,
    /// Microseconds of the broker's process, when it runs on this machine.
    pub broker_us: Option<f64>,
    /// Of them, in the kernel.
    pub broker_system_us: Option<f64>,
    /// Microseconds of this process's threads, summed by thread name (tokio's workers, the
    /// AMQP client's I/O loop, the store's writer), busiest first.
    pub threads: Vec<(String, f64)>,
    /// Context switches of this process's threads (voluntary, waiting for work, and not),
    /// summed by thread name, most first.
    pub switches: Vec<(String, f64)>,
}

impl CpuClock {
    /// Read both clocks now. The broker is the process named `beam.smp` (RabbitMQ's Erlang VM).
    pub fn now() -> CpuClock {
        let broker = broker_pid().and_then(|pid| times_of(&pid).map(|used| (pid, used)));
        CpuClock { own: times_of("self"), threads: threads(), broker }
    }

    /// CPU per event over `events` since this reading.
    pub fn per_event(&self, events: usize) -> CpuPerEvent {
        let per = |before: Duration, after: Duration| after.saturating_sub(before).as_secs_f64() * 1e6 / events as f64;
        let (own_us, own_system_us) = match (self.own, times_of("self")) {
            (Some(before), Some(after)) => (per(before.total(), after.total()), per(before.system, after.system)),
            _ => (f64::NAN, f64::NAN),
        };
        let broker = self.broker.as_ref().and_then(|(pid, before)| Some((*before, times_of(pid)?)));
        let broker_us = broker.map(|(before, after)| per(before.total(), after.total()));
        let broker_system_us = broker.map(|(before, after)| per(before.system, after.system));
        // By thread id, then summed by name: a thread that ended meanwhile (one of tokio's
        // blocking threads, named as its workers are) must not take its time off the others.
        let mut used: BTreeMap<String, f64> = BTreeMap::new();
        let mut switched: BTreeMap<String, f64> = BTreeMap::new();
        for (tid, after) in threads() {
            let before = self.threads.get(&tid);
            let used_before = before.map(|t| t.used).unwrap_or_default();
            let switches_before = before.map(|t| t.switches).unwrap_or_default();
            *used.entry(after.name.clone()).or_default() += per(used_before, after.used);
            *switched.entry(after.name).or_default() +=
                after.switches.saturating_sub(switches_before) as f64 / events as f64;
        }
        CpuPerEvent {
            own_us,
            own_system_us,
            broker_us,
            broker_system_us,
            threads: busiest(used, 0.05),
            switches: busiest(switched, 0.01),
        }
    }
}

/// The entries of `by_name` of at least `least`, largest first.
fn busiest(by_name: BTreeMap<String, f64>, least: f64) -> Vec<(String, f64)> {
    let mut kept: Vec<(String, f64)> = by_name.into_iter().filter(|(_, n)| *n >= least).collect();
    kept.sort_by(|a, b| b.1.total_cmp(&a.1));
    kept
}

/// One of this process's threads: its name, the CPU time it used so far and how often it was
/// switched out.
struct Thread {
    name: String,
    used: Duration,
    switches: u64,
}

/// This process's threads, by thread id.
fn threads() -> BTreeMap<String, Thread> {
    tasks("self")
        .into_iter()
        .filter_map(|(tid, name)| {
            let task = format!("self/task/{tid}");
            let (used, switches) = (times_of(&task)?.total(), switches_of(&task)?);
            Some((tid, Thread { name, used, switches }))
        })
        .collect()
}

/// Context switches of task `task` so far, voluntary and not, from its `status`.
fn switches_of(task: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{task}/status")).ok()?;
    let count =
        |key: &str| -> Option<u64> { status.lines().find_map(|line| line.strip_prefix(key)?.trim().parse().ok()) };
    Some(count("voluntary_ctxt_switches:")? + count("nonvoluntary_ctxt_switches:")?)
}

/// The threads of process `pid` (`self` for this one) that can be read: id and name.
fn tasks(pid: &str) -> Vec<(String, String)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|task| {
            let tid = task.file_name().into_string().ok()?;
            let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
            Some((tid, name.trim().to_string()))
        })
        .collect()
}

/// User and system time of process `pid` (`self` for this one, `self/task/<tid>` for a thread).
fn times_of(pid: &str) -> Option<Times> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_times(&stat)
}

/// `utime` and `stime` of a `stat` line. The command name, in parentheses, may hold spaces:
/// fields are counted after it.
fn stat_times(stat: &str) -> Option<Times> {
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| -> Option<Duration> {
        let n: u64 = fields.get(i)?.parse().ok()?;
        Some(Duration::from_secs_f64(n as f64 / USER_HZ))
    };
    Some(Times { user: ticks(11)?, system: ticks(12)? })
}

fn broker_pid() -> Option<String> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid = entry.file_name().into_string().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    })
}

/// Whether the broker's schedulers are bound to cores (RabbitMQ's default binds each to one),
/// from the threads of `beam.smp` named `<n>_scheduler`. A bound scheduler preempted by the
/// router's threads waits for its own core, which lengthens the broker's stalls: a run's
/// figures depend on it (BENCHMARKS.md, "The broker's schedulers bound to cores").
pub fn broker_schedulers() -> String {
    let Some(pid) = broker_pid() else { return "no RabbitMQ on this machine".into() };
    let mut allowed: Vec<String> = tasks(&pid)
        .into_iter()
        .filter(|(_, name)| name.ends_with("_scheduler"))
        .filter_map(|(tid, _)| std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok())
        .filter_map(|status| allowed_cpus(&status).map(str::to_string))
        .collect();
    allowed.sort();
    binding(&allowed)
}

/// How the kernel weighs the broker against this process when both want the cores. With
/// autogroups on (`kernel.sched_autogroup_enabled`), the processes of each session share one
/// weight, set by their autogroup's nice, so that the threads' own nice values only rank them
/// within it. A broker weighed below its clients lets them publish and consume on time, and
/// the latency's tail depends on it (BENCHMARKS.md, "The broker's CPU weight").
pub fn broker_weight() -> String {
    let Some(pid) = broker_pid() else { return "no RabbitMQ on this machine".into() };
    let enabled = std::fs::read_to_string("/proc/sys/kernel/sched_autogroup_enabled");
    if enabled.is_ok_and(|on| on.trim() == "0") {
        return "autogroups off: each thread weighed by its own nice".into();
    }
    let group = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/autogroup")).ok().and_then(|g| autogroup(&g));
    match (group(&pid), group("self")) {
        (Some(broker), Some(this)) => format!("{broker}; this process: {this}"),
        _ => "unknown (no autogroup could be read)".into(),
    }
}

/// `/proc/<pid>/autogroup` (`/autogroup-36 nice 0`) as `autogroup-36 at nice 0`.
fn autogroup(text: &str) -> Option<String> {
    let (name, nice) = text.trim().split_once(" nice ")?;
    let nice: i32 = nice.parse().ok()?;
    Some(format!("{} at nice {nice}", name.trim_start_matches('/')))
}

/// The `Cpus_allowed_list` of a thread's `/proc` status: `0`, `0-1`, `0,2`…
fn allowed_cpus(status: &str) -> Option<&str> {
    status.lines().find_map(|line| line.strip_prefix("Cpus_allowed_list:")).map(str::trim)
}

/// What the schedulers' allowed CPU lists say about their binding.
fn binding(allowed: &[String]) -> String {
    let single = |cpus: &String| !cpus.contains(['-', ',']);
    if allowed.is_empty() {
        "unknown (no scheduler thread could be read)".into()
    } else if allowed.iter().all(single) {
        format!("each bound to one core ({})", allowed.join(", "))
    } else if allowed.iter().any(single) {
        format!("some bound to one core ({})", allowed.join("; "))
    } else {
        "not bound to cores".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_system_time_are_read_after_a_command_name_with_spaces() {
        let stat = "4242 (tokio rt) worker) S 1 4242 4242 0 -1 4194560 2083 0 0 0 250 75 0 0 20 0 9 0";
        let times = stat_times(stat).unwrap();
        assert_eq!((times.user, times.system), (Duration::from_millis(2500), Duration::from_millis(750)));
        assert_eq!(times.total(), Duration::from_millis(3250));
        assert!(stat_times("4242 (no fields)").is_none());
    }

    #[test]
    fn a_scheduler_s_allowed_cpus_are_read_from_its_status() {
        let status = "Name:\t1_scheduler\nCpus_allowed:\t1\nCpus_allowed_list:\t0\nMems_allowed:\t1\n";
        assert_eq!(allowed_cpus(status), Some("0"));
        assert_eq!(allowed_cpus("Name:\tx\n"), None);
    }

    #[test]
    fn an_autogroup_is_read_with_its_nice() {
        assert_eq!(autogroup("/autogroup-36 nice 5\n").as_deref(), Some("autogroup-36 at nice 5"));
        assert_eq!(autogroup("/autogroup-7 nice -10").as_deref(), Some("autogroup-7 at nice -10"));
        assert_eq!(autogroup("garbage"), None);
    }

    #[test]
    fn schedulers_bound_to_one_core_each_are_told_apart_from_unbound_ones() {
        let lists = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(binding(&lists(&["0", "1"])), "each bound to one core (0, 1)");
        assert_eq!(binding(&lists(&["0-1", "0-1"])), "not bound to cores");
        assert_eq!(binding(&lists(&["0", "0-1"])), "some bound to one core (0; 0-1)");
        assert_eq!(binding(&[]), "unknown (no scheduler thread could be read)");
    }
}
