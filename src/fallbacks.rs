//! Following a mount's fallbacks: from a mount whose source is away, along its `fallback_mount`
//! chain to the first mount with a source, and last to its `fallback_file`'s mount. Admission
//! asks it for a listener arriving during an outage, the fan-out when a grace period ends, and
//! ingest when a source comes back to a mount with `fallback_override`.

use std::sync::Arc;

use crate::config::{file_mount_path, Config, MountSettings};
use crate::framing::same_format;
use crate::mounts::{Mount, Mounts, Snapshot};
use crate::store::SourceState;

/// Most links followed: a chain changed at run time by `/admin/fallbacks` is not checked for
/// loops as the file is, so the walk also remembers where it has been.
const MAX_LINKS: usize = 32;

/// The mount that listeners of `from` (whose settings are `settings`) go to now: the first of
/// its fallback chain with a live source, else its fallback file's mount if it plays. Never
/// `from` itself. With `format` (the `Content-Type` of the stream listeners are in the middle
/// of), only a mount whose stream they can go on decoding ([`same_format`]) is taken; the others
/// are passed over, as mounts without a source are. A newcomer, who has not started decoding,
/// takes any.
pub(crate) fn live_fallback(
    config: &Config,
    mounts: &Mounts,
    from: &str,
    settings: &MountSettings,
    format: Option<&str>,
) -> Option<(Arc<Mount>, Arc<Snapshot>)> {
    let takes = |snap: &Snapshot| {
        snap.state == SourceState::Live
            && format.is_none_or(|f| same_format(f, &snap.info.meta.content_type))
    };
    let mut seen = vec![from.to_string()];
    let mut next = settings.fallback_mount.clone();
    while let Some(path) = next.take() {
        if seen.contains(&path) || seen.len() > MAX_LINKS {
            break;
        }
        match mounts.get(&path) {
            Some(mount) => {
                let snap = mount.store.load_full();
                if takes(&snap) {
                    return Some((mount, snap));
                }
                next = snap.settings.fallback_mount.clone();
            }
            // A mount without a source now: its declared fallback, if any.
            None => {
                next = config
                    .mounts
                    .get(&path)
                    .and_then(|m| m.fallback_mount.clone())
            }
        }
        seen.push(path);
    }
    let file = settings.fallback_file.as_deref()?;
    let mount = mounts.get(&file_mount_path(file))?;
    let snap = mount.store.load_full();
    takes(&snap).then_some((mount, snap))
}
