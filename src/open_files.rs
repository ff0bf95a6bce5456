//! The process's open-file limit: every listener is a descriptor, so it caps how many a server
//! can hold. The only place fanstream reads or changes it.

/// Raises the soft limit to the hard one. The usual soft default (1024) would cap a streaming
/// server far below what the machine can serve; the hard limit is the operator's to set.
/// Returns the soft limit in force afterwards.
pub fn raise_to_hard_limit() -> Option<u64> {
    let mut lim = current()?;
    if lim.rlim_cur < lim.rlim_max {
        let wanted = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads only the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } == 0 {
            lim = wanted;
        } else {
            tracing::warn!(soft = lim.rlim_cur, "could not raise the open-file limit");
        }
    }
    Some(lim.rlim_cur)
}

/// The soft limit in force now.
pub fn soft_limit() -> Option<u64> {
    current().map(|l| l.rlim_cur)
}

fn current() -> Option<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (rc == 0).then_some(lim)
}
