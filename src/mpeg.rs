//! MPEG audio frames (MP3) and ADTS (AAC): STUB, replaced by the real framer.

use bytes::Bytes;

use crate::format::Event;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Mp3,
    Adts,
}

pub(crate) struct Framer {
    kind: Kind,
}

impl Framer {
    pub fn new(kind: Kind) -> Self {
        Framer { kind }
    }

    pub fn push(&mut self, data: Bytes, out: &mut Vec<Event>) {
        if !data.is_empty() {
            out.push(Event::Data {
                bytes: data,
                sync: true,
            });
        }
    }

    pub fn finish(&mut self, _out: &mut Vec<Event>) {}

    pub fn subtype(&self) -> Option<String> {
        let _ = self.kind;
        None
    }
}
