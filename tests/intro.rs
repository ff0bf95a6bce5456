//! `intro_file`: each new listener gets the intro first, then the live stream from a sync point
//! (with its Ogg headers: a chained stream), and the whole capture decodes.

mod common;

use std::time::Instant;

use common::clients::{ffmpeg_decode, ffmpeg_source, make_file, Codec, Tone};
use common::media::{assert_frame_chain, id3v2_len, mpeg_frame_len, ogg_pages};
use common::process::scratch_dir;
use common::*;
use fanstream::MountSettings;

/// Starts a server whose `/live` has `intro`, an ffmpeg source there, and captures a listener
/// until it holds the intro and `live_bytes` more.
fn capture(intro: &std::path::Path, codec: Codec, live_bytes: usize) -> Vec<u8> {
    let srv = TestServer::start(|c| {
        c.mounts.insert(
            "/live".into(),
            MountSettings {
                intro_file: Some(intro.to_path_buf()),
                // Past the ID3 tag ffmpeg sends first, once 20 KB came: the live part is frames.
                burst_bytes: 8192,
                ..c.defaults.clone()
            },
        );
    });
    let mut live = Tone::new(codec, 60.0);
    live.frequency = 330;
    let _source = ffmpeg_source(srv.addr, "/live", &live);
    let start = Instant::now();
    while srv.metric(
        "fanstream_source_received_bytes_total",
        &["mount=\"/live\""],
    ) < 20_000.0
    {
        assert!(
            start.elapsed() < DEADLINE,
            "the ffmpeg source never sent 20 KB"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut l = Listener::connect(srv.addr, "/live");
    let size = std::fs::metadata(intro).unwrap().len() as usize;
    l.read_at_least(size + live_bytes);
    l.body
}

#[test]
fn an_mp3_intro_comes_first_then_the_live_stream_at_a_frame() {
    let dir = scratch_dir("intro_mp3");
    let mut tone = Tone::new(Codec::Mp3, 1.0);
    tone.frequency = 880;
    let file = make_file(&dir, "intro.mp3", &tone);
    let raw = std::fs::read(&file).unwrap();
    // The intro as sent: its frames, without the ID3 tag ffmpeg writes before them.
    let frames = &raw[id3v2_len(&raw)..];
    let intro_len = assert_frame_chain(frames, mpeg_frame_len, "the intro file");
    let capture = capture(&file, Codec::Mp3, 30_000);
    assert_eq!(
        &capture[..intro_len],
        &frames[..intro_len],
        "the capture starts with the intro's frames"
    );
    // Then the live stream, on a frame boundary: the frames chain through the whole capture.
    let complete = assert_frame_chain(&capture, mpeg_frame_len, "intro then live");
    assert!(complete > intro_len + 20_000);
    let path = dir.join("capture.mp3");
    std::fs::write(&path, &capture[..complete]).unwrap();
    let decoded = ffmpeg_decode(&path);
    assert!(decoded.success && decoded.errors.is_empty(), "{decoded:?}");
    assert!(
        decoded.seconds > 1.5,
        "the intro's second and the live part: {decoded:?}"
    );
}

#[test]
fn an_ogg_intro_is_a_whole_stream_then_the_live_one_follows_with_its_headers() {
    let dir = scratch_dir("intro_ogg");
    let mut tone = Tone::new(Codec::Vorbis, 1.0);
    tone.frequency = 880;
    let file = make_file(&dir, "intro.ogg", &tone);
    let intro = std::fs::read(&file).unwrap();
    let capture = capture(&file, Codec::Vorbis, 30_000);
    assert_eq!(
        &capture[..intro.len()],
        &intro[..],
        "the capture starts with the intro"
    );
    let pages = ogg_pages(&capture, "intro then live");
    let after: Vec<_> = pages.iter().filter(|p| p.offset >= intro.len()).collect();
    assert_eq!(
        after[0].offset,
        intro.len(),
        "the live stream starts on a page"
    );
    assert!(
        after[0].bos() && after[0].is_codec_header(),
        "with its headers: {:?}",
        after[0]
    );
    let path = dir.join("capture.ogg");
    let end = pages.last().map(|p| p.offset + p.len).unwrap();
    std::fs::write(&path, &capture[..end]).unwrap();
    let decoded = ffmpeg_decode(&path);
    assert!(decoded.success, "{decoded:?}");
    assert!(decoded.seconds > 1.5, "{decoded:?}");
}

#[test]
fn an_intro_of_another_format_is_not_sent() {
    let dir = scratch_dir("intro_other_format");
    let file = make_file(&dir, "intro.ogg", &Tone::new(Codec::Vorbis, 1.0));
    let capture = capture(&file, Codec::Mp3, 5_000);
    assert_frame_chain(
        &capture,
        mpeg_frame_len,
        "an MP3 stream with an Ogg intro set",
    );
}

#[test]
fn an_icy_listener_gets_the_intro_in_its_block_cadence() {
    use common::media::{icy_listener, icy_metaint, read_while_open, IcyCapture};
    let dir = scratch_dir("intro_icy");
    let mut tone = Tone::new(Codec::Mp3, 1.0);
    tone.frequency = 880;
    let file = make_file(&dir, "intro.mp3", &tone);
    let raw = std::fs::read(&file).unwrap();
    let frames = &raw[id3v2_len(&raw)..];
    let intro_len = assert_frame_chain(frames, mpeg_frame_len, "the intro file");
    let srv = TestServer::start(|c| {
        c.mounts.insert(
            "/live".into(),
            MountSettings {
                intro_file: Some(file.clone()),
                burst_bytes: 8192,
                icy_metaint: 4000,
                ..c.defaults.clone()
            },
        );
    });
    let live = Tone::new(Codec::Mp3, 60.0);
    let _source = ffmpeg_source(srv.addr, "/live", &live);
    let start = Instant::now();
    while srv.metric(
        "fanstream_source_received_bytes_total",
        &["mount=\"/live\""],
    ) < 20_000.0
    {
        assert!(
            start.elapsed() < DEADLINE,
            "the ffmpeg source never sent 20 KB"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (mut s, head) = icy_listener(srv.addr, "/live");
    assert_eq!(icy_metaint(&head), Some(4000), "{head}");
    let mut capture = IcyCapture::new(4000);
    let enough = read_while_open(&mut s, &mut capture, DEADLINE, |c| {
        c.audio.len() > intro_len + 30_000
    });
    assert!(enough, "{} audio bytes", capture.audio.len());
    // Blocks every 4000 bytes from the first audio byte, the intro's included.
    assert!(
        capture.blocks.len() >= (intro_len + 30_000) / 4000,
        "{}",
        capture.blocks.len()
    );
    assert_eq!(&capture.audio[..intro_len], &frames[..intro_len]);
    let complete = assert_frame_chain(&capture.audio, mpeg_frame_len, "ICY audio");
    assert!(complete > intro_len + 20_000);
}
