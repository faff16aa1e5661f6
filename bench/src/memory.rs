//! Resident memory of a process, from `/proc/<pid>/status` (Linux).

/// A `/proc/self/status` figure in MiB: `VmRSS` (now) or `VmHWM` (peak).
pub fn mib(field: &str) -> Option<f64> {
    mib_of("/proc/self/status", field)
}

/// A figure of a process's `status` file in MiB.
pub fn mib_of(status: &str, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(status).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 =
        line.trim_start_matches(field).trim_start_matches(':').trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024.0)
}

/// Start measuring the peak (`VmHWM`) afresh.
pub fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
