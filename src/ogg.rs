//! Ogg pages: STUB, replaced by the real framer.

use bytes::Bytes;

use crate::format::{Event, FormatError};

pub(crate) struct Framer {}

impl Framer {
    pub fn new() -> Self {
        Framer {}
    }

    pub fn push(&mut self, data: Bytes, out: &mut Vec<Event>) -> Result<(), FormatError> {
        if !data.is_empty() {
            out.push(Event::Data {
                bytes: data,
                sync: true,
            });
        }
        Ok(())
    }

    pub fn finish(&mut self, _out: &mut Vec<Event>) {}

    pub fn subtype(&self) -> Option<String> {
        None
    }
}
