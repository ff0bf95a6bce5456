//! A fallback file played in a loop as a mount's source (`fallback_file`): the file is read
//! once into memory and cut into pieces stamped with when they are due (MP3 frames by their
//! sample counts, Ogg pages by their granule positions), and its own thread hands them to
//! ingest at that pace, through the same [`SourceConn`] the demo and encoders use, round and
//! round until the server stops. The pieces share the file's one buffer: a loop costs nothing
//! but the sends.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, watch};

use crate::config::{file_format, Config, FileFormat};
use crate::conn::{Feed, SourceConn};
use crate::mpeg::{found_at, Found, Kind};
use crate::shared::{stopped, Stop};
use crate::store::{StreamInfo, StreamMeta};

/// Frames or pages are sent together until they span this much: an encoder's pace, or so.
const PIECE: Duration = Duration::from_millis(100);
/// Pieces in flight to ingest: a few seconds' worth, so a busy ingest thread costs no gap.
const PIECES_IN_FLIGHT: usize = 32;

/// A frame or page of a file: where it starts and ends, and when it is due from the start.
type Unit = (usize, usize, Duration);

/// A file cut into the pieces it is played in.
pub(crate) struct Looped {
    format: FileFormat,
    /// Each round's pieces, with when each is due from the start of the round; rounds take
    /// these in turn. An Ogg file has two, whose streams differ in serial number only: each
    /// round is a new link of a chained stream, which a decoder takes for a new stream (with
    /// its own timestamps) only if its serial differs from the one before.
    rounds: Vec<Vec<(Bytes, Duration)>>,
    /// How long one round lasts.
    length: Duration,
}

/// Reads `file` and cuts it into timed pieces; the error says what is wrong with it.
pub(crate) fn load(file: &Path) -> Result<Looped, String> {
    let format = file_format(file).ok_or("not an MP3 or Ogg file by its extension")?;
    let data = std::fs::read(file).map_err(|e| e.to_string())?;
    let (units, length) = match format {
        FileFormat::Mp3 => mp3_frames(&data),
        FileFormat::Ogg => ogg_pages(&data)?,
    };
    if units.is_empty() || length.is_zero() {
        return Err(match format {
            FileFormat::Mp3 => "no MPEG audio frames in it".into(),
            FileFormat::Ogg => "no timed Ogg pages in it".into(),
        });
    }
    let mut copies = vec![data];
    if format == FileFormat::Ogg {
        copies.push(reserialed(&copies[0], &units));
    }
    let rounds = copies
        .into_iter()
        .map(|data| cut(Bytes::from(data), &units))
        .collect();
    Ok(Looped {
        format,
        rounds,
        length,
    })
}

/// Reads an `intro_file`: its whole MP3 frames (no tags) or Ogg pages, from the first to the
/// last, as one piece sent before the live stream.
pub(crate) fn load_intro(file: &Path) -> Result<Bytes, String> {
    let format = file_format(file).ok_or("not an MP3 or Ogg file by its extension")?;
    let data = std::fs::read(file).map_err(|e| e.to_string())?;
    let (units, _) = match format {
        FileFormat::Mp3 => mp3_frames(&data),
        FileFormat::Ogg => ogg_pages(&data)?,
    };
    match (units.first(), units.last()) {
        (Some(&(start, _, _)), Some(&(_, end, _))) => Ok(Bytes::from(data).slice(start..end)),
        _ => Err("no MPEG audio frames or Ogg pages in it".into()),
    }
}

/// Loads every `intro_file` of the config; the error names the file and what is wrong.
pub(crate) fn load_intros(config: &Config) -> Result<HashMap<PathBuf, Bytes>, String> {
    config
        .intro_files()
        .into_iter()
        .map(|file| {
            let intro =
                load_intro(file).map_err(|e| format!("intro_file = {}: {e}", file.display()))?;
            Ok((file.to_path_buf(), intro))
        })
        .collect()
}

/// Runs of frames or pages at most `PIECE` long, each one slice of the file.
fn cut(data: Bytes, units: &[Unit]) -> Vec<(Bytes, Duration)> {
    let mut pieces: Vec<(Bytes, Duration)> = Vec::new();
    let mut run: Option<Unit> = None;
    for &(start, end, at) in units {
        run = match run {
            Some((s, e, t)) if e == start && at < t + PIECE => Some((s, end, t)),
            Some((s, e, t)) => {
                pieces.push((data.slice(s..e), t));
                Some((start, end, at))
            }
            None => Some((start, end, at)),
        };
    }
    if let Some((s, e, t)) = run {
        pieces.push((data.slice(s..e), t));
    }
    pieces
}

/// The Ogg file with every page's serial number changed (the same change for all, so
/// multiplexed streams stay apart) and its CRC made again.
fn reserialed(data: &[u8], pages: &[Unit]) -> Vec<u8> {
    let mut out = data.to_vec();
    for &(start, end, _) in pages {
        let page = &mut out[start..end];
        for b in &mut page[14..18] {
            *b ^= 0x5A;
        }
        let crc = crate::ogg::page_crc(page);
        page[22..26].copy_from_slice(&crc.to_le_bytes());
    }
    out
}

/// MP3 frames as (start, end, due), skipping ID3 tags and whatever is not a frame; and the
/// length of the whole.
fn mp3_frames(data: &[u8]) -> (Vec<Unit>, Duration) {
    let mut at = 0;
    let mut frames = Vec::new();
    let mut samples = 0.0_f64;
    while at < data.len() {
        match found_at(Kind::Mp3, &data[at..]) {
            Found::Frame {
                len,
                samples: n,
                rate,
                ..
            } if at + len <= data.len() => {
                frames.push((at, at + len, Duration::from_secs_f64(samples)));
                samples += f64::from(n) / f64::from(rate);
                at += len;
            }
            Found::Tag(len) => at += len,
            _ => at += 1,
        }
    }
    (frames, Duration::from_secs_f64(samples))
}

/// Ogg pages as (start, end, due), a page due when the page before it ends (by granule
/// position, at the rate the first stream's header gives: Vorbis's own, Opus's 48 kHz); and
/// the length of the whole.
fn ogg_pages(data: &[u8]) -> Result<(Vec<Unit>, Duration), String> {
    let mut pages = Vec::new();
    let mut rate = None;
    let mut at = 0;
    let (mut due, mut end) = (Duration::ZERO, Duration::ZERO);
    while at + 27 <= data.len() {
        let b = &data[at..];
        if &b[..4] != b"OggS" {
            return Err(format!("no Ogg page at byte {at}"));
        }
        let segments = usize::from(b[26]);
        let body_at = 27 + segments;
        let Some(lacing) = b.get(27..body_at) else {
            break;
        };
        let len = body_at + lacing.iter().map(|&l| usize::from(l)).sum::<usize>();
        if len > b.len() {
            break;
        }
        let body = &b[body_at..len];
        if rate.is_none() && b[5] & 2 != 0 {
            rate = if body.starts_with(b"\x01vorbis") && body.len() >= 16 {
                Some(u32::from_le_bytes([body[12], body[13], body[14], body[15]]))
            } else if body.starts_with(b"OpusHead") {
                Some(48000)
            } else {
                return Err("its first stream is neither Vorbis nor Opus".into());
            };
        }
        let granule = u64::from_le_bytes(b[6..14].try_into().expect("8 bytes"));
        pages.push((at, at + len, due));
        if let Some(rate) = rate.filter(|&r| r > 0 && granule != u64::MAX) {
            end = end.max(Duration::from_secs_f64(granule as f64 / f64::from(rate)));
            due = end;
        }
        at += len;
    }
    Ok((pages, end))
}

/// The file as a source for `path`, and the player that feeds it once ingest has claimed it.
pub(crate) fn source(path: &str, file: &Path, looped: Looped) -> (SourceConn, Player) {
    let name = file
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let meta = StreamMeta {
        content_type: looped.format.content_type().into(),
        name: Some(name),
        description: Some("fallback file, played in a loop".into()),
        public: Some("0".into()),
        started: Some(std::time::SystemTime::now()),
        ..StreamMeta::default()
    };
    let (tx, rx) = mpsc::channel(PIECES_IN_FLIGHT);
    let source = SourceConn {
        mount: path.to_string(),
        info: StreamInfo::new(meta, Bytes::new()),
        feed: Feed::Pieces {
            rx,
            origin: format!("file {}", file.display()),
        },
        log: None,
        claimed: None,
    };
    let player = Player { pieces: tx, looped };
    (source, player)
}

/// Plays a file into its mount.
pub(crate) struct Player {
    pieces: mpsc::Sender<Bytes>,
    looped: Looped,
}

/// The file's thread: plays until the server stops or ingest lets the source go.
pub(crate) fn run(rt: Runtime, player: Player, mut stop: watch::Receiver<Stop>) {
    rt.block_on(async move {
        tokio::select! {
            _ = stopped(&mut stop) => {}
            _ = play(player) => {}
        }
    });
}

async fn play(player: Player) {
    let Player { pieces, looped } = player;
    let start = tokio::time::Instant::now();
    for (round, pieces_of_round) in (0u32..).zip(looped.rounds.iter().cycle()) {
        let from = start + looped.length * round;
        for (piece, at) in pieces_of_round {
            tokio::time::sleep_until(from + *at).await;
            if pieces.send(piece.clone()).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mp3_frames_are_timed_by_their_samples() {
        // MPEG-1 layer III, 128 kbit/s, 44.1 kHz: 417 bytes, 1152 samples.
        let frame = |pad: u8| {
            let mut f = vec![0xFF, 0xFB, 0x90 | pad << 1, 0x00];
            f.resize(417 + usize::from(pad), 0);
            f
        };
        // A leading ID3v2 tag of 449 bytes (its size is 7 bits a byte) holding what looks like
        // a frame, and an ID3v1 tag at the end: both skipped whole.
        let mut data = b"ID3\x04\x00\x00\x00\x00\x03\x41".to_vec();
        data.extend(frame(0));
        data.resize(10 + 449, 0);
        let tag = data.len();
        data.extend(b"junk");
        for i in 0..10 {
            data.extend(frame(i % 2));
        }
        let mut id3v1 = b"TAG".to_vec();
        id3v1.resize(128, 0xFF);
        data.extend(id3v1);
        let (frames, length) = mp3_frames(&data);
        assert_eq!(frames.len(), 10);
        assert_eq!(
            frames[0].0,
            tag + 4,
            "the tag and the junk before the first frame are skipped"
        );
        assert_eq!(frames[1].0 - frames[0].0, 417);
        let frame_time = 1152.0 / 44100.0;
        assert!((length.as_secs_f64() - 10.0 * frame_time).abs() < 1e-6);
        assert!((frames[3].2.as_secs_f64() - 3.0 * frame_time).abs() < 1e-6);
    }
}
