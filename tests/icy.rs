//! Titles and ICY metadata at the protocol level: `/admin/metadata` and SHOUTcast's `admin.cgi`
//! (who may call them, what they answer), and ICY listeners receiving a block after exactly every
//! `icy_metaint` bytes of audio, the audio between blocks byte-exact, titles arriving within an
//! interval and unable to forge a field. Real encoders and players are in titles.rs.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use serde_json::Value;

const METAINT: usize = 1024;

fn server() -> TestServer {
    TestServer::start(|c| {
        c.defaults.icy_metaint = METAINT;
        // Written as it comes, so the test sees each piece at once.
        c.defaults.max_write_delay_ms = 0;
    })
}

/// `GET target` with optional Basic credentials: (status, head, body).
fn get(addr: SocketAddr, target: &str, creds: Option<(&str, &str)>) -> (u16, String, String) {
    let auth = creds
        .map(|(u, p)| format!("Authorization: Basic {}\r\n", basic(u, p)))
        .unwrap_or_default();
    let raw = format!("GET {target} HTTP/1.0\r\nUser-Agent: libshout/2.4.6\r\n{auth}\r\n");
    let (status, head, body) = request(addr, raw.as_bytes());
    (status, head, String::from_utf8_lossy(&body).into_owned())
}

fn update(addr: SocketAddr, mount: &str, query: &str) -> u16 {
    let target = format!("/admin/metadata?mode=updinfo&mount={mount}&{query}");
    get(addr, &target, Some(("source", PASSWORD))).0
}

/// An ICY listener: reads the stream and splits it into audio and blocks as a player does.
struct IcyListener {
    stream: TcpStream,
    head: String,
    audio: Vec<u8>,
    /// Each block's text, with the audio offset (into `audio`) it came after.
    blocks: Vec<(usize, String)>,
    /// Unparsed bytes, and how much audio is still owed before the next block.
    raw: Vec<u8>,
    until_block: usize,
}

impl IcyListener {
    fn connect(addr: SocketAddr, mount: &str) -> IcyListener {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        std::io::Write::write_all(
            &mut stream,
            format!("GET {mount} HTTP/1.1\r\nHost: t\r\nIcy-MetaData: 1\r\n\r\n").as_bytes(),
        )
        .unwrap();
        let head = read_head(&mut stream);
        IcyListener {
            stream,
            head,
            audio: Vec::new(),
            blocks: Vec::new(),
            raw: Vec::new(),
            until_block: METAINT,
        }
    }

    /// Reads until `n` audio bytes have arrived, parsing blocks as they come.
    fn read_audio(&mut self, n: usize) {
        let mut buf = [0u8; 16 * 1024];
        while self.audio.len() < n {
            let k = common::read_some(&mut self.stream, &mut buf).expect("stream read");
            assert!(k > 0, "stream ended after {} audio bytes", self.audio.len());
            self.raw.extend_from_slice(&buf[..k]);
            self.parse();
        }
    }

    fn parse(&mut self) {
        loop {
            if self.until_block > 0 {
                let take = self.until_block.min(self.raw.len());
                self.audio.extend(self.raw.drain(..take));
                self.until_block -= take;
                if self.until_block > 0 {
                    return;
                }
            }
            let Some(&len) = self.raw.first() else {
                return;
            };
            let len = len as usize * 16;
            if self.raw.len() < 1 + len {
                return;
            }
            let text = String::from_utf8_lossy(&self.raw[1..1 + len])
                .trim_end_matches('\0')
                .to_string();
            self.blocks.push((self.audio.len(), text));
            self.raw.drain(..1 + len);
            self.until_block = METAINT;
        }
    }
}

#[test]
fn icy_listeners_get_a_block_every_metaint_bytes_and_titles_within_an_interval() {
    let srv = server();
    let mut src = Source::connect(srv.addr, "/live");
    src.send(&pattern(0, 4000));
    let mut icy = IcyListener::connect(srv.addr, "/live");
    assert!(
        icy.head.contains(&format!("icy-metaint: {METAINT}\r\n")),
        "{}",
        icy.head
    );
    let mut plain = Listener::connect(srv.addr, "/live");
    assert!(!plain.head.contains("\r\nicy-metaint:"), "{}", plain.head);

    let mut sent = 4000u64;
    src.send_pattern(sent, sent + 6000, 500, Duration::ZERO);
    sent += 6000;
    icy.read_audio(5000);
    assert_eq!(update(srv.addr, "/live", "song=First%20Song"), 200);
    let at_update = sent;
    src.send_pattern(sent, sent + 10_000, 500, Duration::from_millis(5));
    sent += 10_000;
    assert_eq!(update(srv.addr, "/live", "artist=Band&title=Second"), 200);
    let at_second = sent;
    src.send_pattern(sent, sent + 10_000, 500, Duration::from_millis(5));
    sent += 10_000;

    // Everything but the last partial interval has arrived once the listener is near the end.
    let join = locate(&plain_first(&mut plain)).expect("plain listener gets the stream");
    let wanted = (sent - join) as usize - METAINT;
    icy.read_audio(wanted);

    // The audio between the blocks is the stream, exactly, from the same join point.
    let icy_join = locate(&icy.audio).expect("ICY audio is the stream");
    assert_eq!(icy_join, join, "both listeners join at the same point");
    assert_eq!(
        icy.audio,
        pattern(icy_join, icy.audio.len()),
        "audio between blocks"
    );

    // A block after every METAINT audio bytes, no more, no less.
    for (i, (at, _)) in icy.blocks.iter().enumerate() {
        assert_eq!(*at, (i + 1) * METAINT, "block {i} after {at} audio bytes");
    }
    // Titles: empty blocks while nothing changes, the new title in the first block after the
    // interval in progress when it was set.
    let titled: Vec<(u64, &str)> = icy
        .blocks
        .iter()
        .filter(|(_, t)| !t.is_empty())
        .map(|(at, t)| (join + *at as u64, t.as_str()))
        .collect();
    let first = titled
        .iter()
        .find(|(_, t)| *t == "StreamTitle='First Song';")
        .unwrap_or_else(|| panic!("first title never came: {titled:?}"));
    assert!(
        first.0 <= at_update + 2 * METAINT as u64,
        "first title at {}, set at {at_update}",
        first.0
    );
    let second = titled
        .iter()
        .find(|(_, t)| *t == "StreamTitle='Band - Second';")
        .unwrap_or_else(|| panic!("second title never came: {titled:?}"));
    assert!(second.0 <= at_second + 2 * METAINT as u64);
    assert!(
        titled.iter().filter(|(_, t)| t.contains("Second")).count() == 1,
        "an unchanged title is not sent again: {titled:?}"
    );

    // Counted: the update and the ICY listener.
    assert_eq!(
        srv.metric("fanstream_metadata_updates_total", &["mount=\"/live\""]),
        2.0
    );
    assert_eq!(
        srv.metric("fanstream_icy_listeners", &["mount=\"/live\""]),
        1.0
    );
    drop(icy);
    srv.wait_metric("fanstream_icy_listeners", &["mount=\"/live\""], |v| {
        v == 0.0
    });
}

/// The first bytes a plain listener received, enough to locate its join point.
fn plain_first(l: &mut Listener) -> Vec<u8> {
    l.read_at_least(64);
    l.body.clone()
}

#[test]
fn a_hostile_title_cannot_add_a_field() {
    let srv = server();
    let mut src = Source::connect(srv.addr, "/live");
    src.send(&pattern(0, 2000));
    let mut icy = IcyListener::connect(srv.addr, "/live");
    let evil = "a%27%3BStreamUrl%3D%27http%3A%2F%2Fevil%27%3Bx%0D%0AX";
    assert_eq!(update(srv.addr, "/live", &format!("song={evil}")), 200);
    src.send_pattern(2000, 8000, 1000, Duration::from_millis(2));
    icy.read_audio(4000);
    let text = icy
        .blocks
        .iter()
        .map(|(_, t)| t.clone())
        .find(|t| t.contains("evil"))
        .expect("the title arrives");
    assert!(text.starts_with("StreamTitle='"), "{text}");
    assert_eq!(
        text.matches('\'').count(),
        2,
        "one quoted field only: {text}"
    );
    assert!(!text.contains("StreamUrl='"), "{text}");
    assert!(!text.contains('\r') && !text.contains('\n'), "{text}");
}

#[test]
fn title_updates_need_the_mounts_source_or_the_admin_credentials() {
    let srv = TestServer::start(|c| c.admin_password = Some("adminpw".into()));
    let mut src = Source::connect(srv.addr, "/live");
    src.send(&pattern(0, 1000));
    let target = "/admin/metadata?mode=updinfo&mount=/live&song=x";

    let (status, head, _) = get(srv.addr, target, None);
    assert_eq!(status, 401);
    assert!(
        head.contains("WWW-Authenticate: Basic realm=\"fanstream\""),
        "{head}"
    );
    assert_eq!(get(srv.addr, target, Some(("source", "wrong"))).0, 401);

    let (status, head, body) = get(srv.addr, target, Some(("source", PASSWORD)));
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("Content-Type: text/xml"), "{head}");
    assert_eq!(
        body,
        "<?xml version=\"1.0\"?>\n<iceresponse><message>Metadata update successful</message><return>1</return></iceresponse>\n"
    );
    assert_eq!(get(srv.addr, target, Some(("admin", "adminpw"))).0, 200);
    // The admin port takes the same request, with either credentials.
    assert_eq!(get(srv.admin, target, Some(("source", PASSWORD))).0, 200);
    assert_eq!(get(srv.admin, target, None).0, 401);

    let bad_mode = "/admin/metadata?mode=nope&mount=/live&song=x";
    let (status, _, body) = get(srv.addr, bad_mode, Some(("source", PASSWORD)));
    assert_eq!(
        (status, body.as_str()),
        (400, "400 Bad Request: bad query\n")
    );
    let no_title = "/admin/metadata?mode=updinfo&mount=/live";
    assert_eq!(get(srv.addr, no_title, Some(("source", PASSWORD))).0, 400);
    let unknown = "/admin/metadata?mode=updinfo&mount=/nowhere&song=x";
    let (status, _, body) = get(srv.addr, unknown, Some(("source", PASSWORD)));
    assert_eq!(
        (status, body.as_str()),
        (404, "404 Not Found: unknown mount\n")
    );

    // SHOUTcast v1: the password in the query.
    let sc = format!("/admin.cgi?mode=updinfo&pass={PASSWORD}&mount=/live&song=From%20SHOUTcast");
    assert_eq!(get(srv.addr, &sc, None).0, 200);
    let sc_bad = "/admin.cgi?mode=updinfo&pass=wrong&mount=/live&song=x";
    assert_eq!(get(srv.addr, sc_bad, None).0, 401);

    let (_, _, metrics) = get(srv.admin, "/metrics", Some(("admin", "adminpw")));
    let reason = ["reason=\"bad_query\""];
    let bad_queries = metric_value(&metrics, "fanstream_rejected_requests_total", &reason);
    assert_eq!(bad_queries, 2.0);
}

/// Title versions are counted per mount: a listener moved to a mount whose title was set as
/// many times as its own still gets that mount's title at its next block.
#[test]
fn a_moved_icy_listener_gets_the_new_mounts_title() {
    let srv = server();
    let a = Source::connect(srv.addr, "/a").keep_writing(0, 500, Duration::from_millis(5));
    let b = Source::connect(srv.addr, "/b").keep_writing(0, 500, Duration::from_millis(5));
    assert_eq!(update(srv.addr, "/a", "song=On%20A"), 200);
    assert_eq!(update(srv.addr, "/b", "song=On%20B"), 200);
    let mut icy = IcyListener::connect(srv.addr, "/a");
    let start = std::time::Instant::now();
    while !icy.blocks.iter().any(|(_, t)| t.contains("On A")) {
        assert!(start.elapsed() < DEADLINE, "no title on /a");
        let had = icy.audio.len();
        icy.read_audio(had + METAINT);
    }
    let (status, _, body) = get(
        srv.admin,
        "/admin/moveclients?mount=/a&destination=/b",
        None,
    );
    assert_eq!(status, 200, "{body}");
    let start = std::time::Instant::now();
    while !icy.blocks.iter().any(|(_, t)| t.contains("On B")) {
        assert!(
            start.elapsed() < DEADLINE,
            "the moved listener never got /b's title"
        );
        let had = icy.audio.len();
        icy.read_audio(had + METAINT);
    }
    a.stop();
    b.stop();
}

#[test]
fn titles_show_in_both_status_pages() {
    let srv = server();
    let mut src = Source::connect(srv.addr, "/live");
    src.send(&pattern(0, 1000));
    let status = |path: &str| -> Value {
        serde_json::from_str(&get(srv.addr, path, None).2).expect("status is JSON")
    };
    assert_eq!(status("/status.json")["mounts"][0]["title"], Value::Null);
    assert_eq!(
        update(
            srv.addr,
            "/live",
            "artist=The%20Band&title=A%20Song&charset=UTF-8"
        ),
        200
    );
    let wait_title = |what: &str| {
        wait_until(what, || {
            status("/status.json")["mounts"][0]["title"] == "A Song"
        })
    };
    wait_title("the title in /status.json");
    let own = status("/status.json");
    assert_eq!(own["mounts"][0]["artist"], "The Band");
    assert!(own["mounts"][0]["metadata_updated"].is_string());
    // Icecast's document has both in `title` for a stream without tags of its own (MP3), as
    // players show it: panels and now-playing widgets read `title` alone.
    let ice = status("/status-json.xsl");
    assert_eq!(ice["icestats"]["source"]["title"], "The Band - A Song");
    assert_eq!(ice["icestats"]["source"]["artist"], Value::Null);
    let (_, _, stats) = get(srv.admin, "/admin/stats", None);
    assert!(
        stats.contains("<title>The Band - A Song</title>"),
        "{stats}"
    );
    assert!(!stats.contains("<artist>"), "{stats}");

    // Latin-1, as some encoders send it.
    assert_eq!(
        update(srv.addr, "/live", "song=Caf%E9&charset=ISO-8859-1"),
        200
    );
    wait_until("the Latin-1 title", || {
        status("/status-json.xsl")["icestats"]["source"]["title"] == "Café"
    });
    // Windows-1252 from an old encoder that names no charset (SAM, Winamp plug-ins): not
    // UTF-8, so taken as what they send.
    assert_eq!(
        update(srv.addr, "/live", "song=%93Caf%E9%94%20%96%20Noir"),
        200
    );
    wait_until("the Windows-1252 title", || {
        status("/status-json.xsl")["icestats"]["source"]["title"] == "“Café” – Noir"
    });
}

#[test]
fn ogg_streams_get_no_icy_blocks() {
    let srv = server();
    let head = format!(
        "PUT /radio.ogg HTTP/1.1\r\nAuthorization: Basic {}\r\nContent-Type: audio/ogg\r\n\r\n",
        basic("source", PASSWORD)
    );
    let _src = Source::connect_raw(srv.addr, head.as_bytes());
    let icy = IcyListener::connect(srv.addr, "/radio.ogg");
    assert!(icy.head.starts_with("HTTP/1.0 200"), "{}", icy.head);
    assert!(!icy.head.contains("\r\nicy-metaint:"), "{}", icy.head);
    assert_eq!(srv.metric("fanstream_icy_listeners", &[]), 0.0);
}
