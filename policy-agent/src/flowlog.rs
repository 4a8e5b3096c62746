//! The flow log: verdict events from the classifier's ring buffer, as JSON lines naming the
//! pods and the policy rule that decided.

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aya::maps::{Map, MapData, RingBuf};
use policy_common::{
    Direction, counters::Reason, event::{CONFIG_EVENTS_ALLOWED, CONFIG_EVENTS_DENIED, VerdictEvent}, family,
    policy::COOKIE_ISOLATED,
};
use serde::Serialize;
use tokio::io::unix::AsyncFd;

use crate::{
    AgentError,
    datapath::{PinLayout, map_name},
    metrics::{Directory, SharedView, read},
    resolve::protocol_name,
};

/// Which verdicts the classifier reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FlowLogMode {
    /// Drops (and audit-mode would-be drops).
    Denied,
    /// Drops and newly allowed flows.
    All,
    Off,
}

impl FlowLogMode {
    /// The classifier's config flags for this mode.
    pub fn config_flags(self) -> u32 {
        match self {
            FlowLogMode::Denied => CONFIG_EVENTS_DENIED,
            FlowLogMode::All => CONFIG_EVENTS_DENIED | CONFIG_EVENTS_ALLOWED,
            FlowLogMode::Off => 0,
        }
    }
}

/// One flow-log line.
#[derive(Debug, Serialize)]
pub struct FlowRecord {
    pub time: String,
    pub verdict: &'static str,
    pub reason: &'static str,
    /// The pod whose policy judged the packet, and from its side.
    pub pod: Option<String>,
    pub direction: &'static str,
    pub protocol: String,
    pub src: Option<String>,
    pub src_ip: IpAddr,
    pub src_port: u16,
    pub dst: Option<String>,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    /// The rule that decided the flow (allowed or denied it), or the policies isolating the
    /// pod for a drop no entry decided.
    pub policy: Option<String>,
}

fn addr(family_tag: u8, bytes: &[u8; 16]) -> IpAddr {
    if family_tag == family::IPV4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    }
}

/// Turns an event into a record, naming what the directory knows.
pub fn record(event: &VerdictEvent, directory: &Directory, boot_offset: Duration) -> FlowRecord {
    let reason = Reason::from_u32(u32::from(event.reason));
    let src_ip = addr(event.family, &event.src_addr);
    let dst_ip = addr(event.family, &event.dst_addr);
    let verdict = match reason {
        Some(r) if r.is_drop() => "deny",
        Some(Reason::PassAudit) => "audit-deny",
        _ => "allow",
    };
    let direction = Direction::from_u8(event.direction).unwrap_or(Direction::Ingress);
    let isolated_by = || directory.isolated_by.get(&(event.endpoint, direction)).map(|p| format!("isolated by {p}; no rule allows it"));
    let policy = match event.cookie {
        0 => isolated_by(),
        // A deny entry that keeps NetworkPolicy isolation: name the isolating policies.
        COOKIE_ISOLATED => isolated_by().or_else(|| directory.cookies.get(&COOKIE_ISOLATED).cloned()),
        cookie => Some(directory.cookies.get(&cookie).cloned().unwrap_or_else(|| format!("cookie {cookie}"))),
    };
    let time = UNIX_EPOCH + boot_offset + Duration::from_nanos(event.timestamp_ns);
    FlowRecord {
        time: rfc3339(time),
        verdict,
        reason: reason.map_or("unknown", Reason::name),
        pod: directory.pods_by_endpoint.get(&event.endpoint).cloned(),
        direction: if direction == Direction::Egress { "egress" } else { "ingress" },
        protocol: protocol_name(event.protocol).to_owned(),
        src: directory.pods_by_ip.get(&src_ip).cloned(),
        src_ip,
        src_port: event.src_port(),
        dst: directory.pods_by_ip.get(&dst_ip).cloned(),
        dst_ip,
        dst_port: event.dst_port(),
        policy,
    }
}

/// UTC time in RFC 3339 with milliseconds.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Wall-clock time of the monotonic clock's zero (what `bpf_ktime_get_ns` counts from).
fn boot_offset() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    let mono = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().saturating_sub(mono)
}

/// Reads the pinned ring buffer until the process ends, writing a JSON line per event to
/// `file` (appending) or stdout.
pub async fn run(pins: PinLayout, view: SharedView, file: Option<PathBuf>) -> Result<(), AgentError> {
    let path = pins.map(map_name::EVENTS);
    let data = MapData::from_pin(&path).map_err(|e| AgentError::Ebpf { what: format!("open {}", path.display()), source: Box::new(e) })?;
    let ring = RingBuf::try_from(Map::RingBuf(data)).map_err(|e| AgentError::Ebpf { what: "events ring".into(), source: Box::new(e) })?;
    // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged, for as long as the
    // AsyncFd owns the ring buffer.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| AgentError::Read { path: path.clone(), source: e.into() })?;
    let mut out: Box<dyn std::io::Write + Send> = match &file {
        Some(p) => Box::new(
            std::fs::OpenOptions::new().create(true).append(true).open(p).map_err(|source| AgentError::Read { path: p.clone(), source })?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let offset = boot_offset();
    loop {
        let mut guard = ring.readable_mut().await.map_err(|source| AgentError::Read { path: path.clone(), source })?;
        let ring = guard.get_inner_mut();
        let mut lines = Vec::new();
        {
            let directory = read(&view).directory.clone();
            while let Some(item) = ring.next() {
                if item.len() >= size_of::<VerdictEvent>() {
                    let event: VerdictEvent = bytemuck::pod_read_unaligned(&item[..size_of::<VerdictEvent>()]);
                    if let Ok(line) = serde_json::to_string(&record(&event, &directory, offset)) {
                        lines.push(line);
                    }
                }
            }
        }
        for line in lines {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_times() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_millis(1_795_000_000_123)), "2026-11-18T11:06:40.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000Z");
    }

    fn event(reason: Reason, cookie: u32) -> VerdictEvent {
        let mut event: VerdictEvent = bytemuck::Zeroable::zeroed();
        event.endpoint = 7;
        event.reason = reason as u8;
        event.cookie = cookie;
        event.family = family::IPV4;
        event
    }

    #[test]
    fn a_deny_names_the_rule_that_decided() {
        let rule = "ClusterNetworkPolicy/deny-db (Admin, priority 10, ingress rule 0: Deny)";
        let directory = Directory {
            cookies: [(40, rule.to_owned()), (COOKIE_ISOLATED, "isolated by NetworkPolicy: no rule allows".to_owned())].into(),
            isolated_by: [((7, Direction::Ingress), "x/db-allow-api".to_owned())].into(),
            ..Directory::default()
        };
        let denied = record(&event(Reason::DropDeny, 40), &directory, Duration::ZERO);
        assert_eq!((denied.verdict, denied.reason, denied.policy.as_deref()), ("deny", "drop_deny", Some(rule)));
        let isolated = record(&event(Reason::DropDeny, COOKIE_ISOLATED), &directory, Duration::ZERO);
        assert_eq!(isolated.policy.as_deref(), Some("isolated by x/db-allow-api; no rule allows it"));
        let audited = record(&event(Reason::PassAudit, 40), &directory, Duration::ZERO);
        assert_eq!((audited.verdict, audited.policy.as_deref()), ("audit-deny", Some(rule)));
    }
}
