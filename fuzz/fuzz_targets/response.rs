//! The backend response parser (`wire::parse_response_head`) and body
//! framing (`wire::BodyReader`, de-chunking included) on arbitrary bytes,
//! delivered in arbitrary pieces: the first byte picks the request's method
//! and whether it asked for an upgrade, the next four seed the piece sizes.
//! Whatever the pieces, the outcome (heads, body bytes, trailers, errors,
//! what is left for the next response) must be the one of a single read.
#![no_main]

use bytes::BytesMut;
use hyper::Method;
use interlude::proxy::http::wire::{BodyReader, Parsed, ResponseFraming, Step, parse_response_head};
use libfuzzer_sys::fuzz_target;

/// Piece sizes from a seed (xorshift): mostly small, sometimes large.
struct Pieces(u32);

impl Pieces {
    fn next(&mut self) -> usize {
        let mut x = self.0.max(1);
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        if x.is_multiple_of(8) {
            (x >> 8) as usize % 512 + 1
        } else {
            (x >> 8) as usize % 16 + 1
        }
    }
}

/// What a client of the proxy would see of the backend's bytes.
#[derive(Debug, PartialEq)]
enum Event {
    Interim,
    Head {
        status: u16,
        version: String,
        framing: ResponseFraming,
        keep_alive: bool,
        headers: Vec<(String, Vec<u8>)>,
    },
    Body(Vec<u8>),
    Trailers(Vec<(String, Vec<u8>)>),
    Error(String),
    /// The backend closed the connection here.
    Eof,
    /// The connection became a tunnel (101) or cannot carry more.
    Stop,
}

/// Plays `wire` through the parser, fed by `pieces` (none: all at once).
fn play(wire: &[u8], method: &Method, upgrade: bool, mut pieces: Option<Pieces>) -> (Vec<Event>, Vec<u8>) {
    let mut events = Vec::new();
    let mut buf = BytesMut::new();
    let mut rest = wire;
    let mut feed = |buf: &mut BytesMut| -> bool {
        if rest.is_empty() {
            return false;
        }
        let n = pieces.as_mut().map_or(rest.len(), Pieces::next).min(rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        true
    };
    'responses: for _ in 0..4 {
        let head = loop {
            match parse_response_head(&mut buf, method, upgrade) {
                Ok(Parsed::Partial) => {
                    if !feed(&mut buf) {
                        events.push(Event::Eof);
                        break 'responses;
                    }
                }
                Ok(Parsed::Interim) => events.push(Event::Interim),
                Ok(Parsed::Final(head)) => break head,
                Err(e) => {
                    events.push(Event::Error(e.to_string()));
                    break 'responses;
                }
            }
        };
        let response = &head.response;
        assert!(!response.headers().contains_key("transfer-encoding"));
        assert!(
            response.status() == 101 || !response.headers().contains_key("upgrade"),
            "Upgrade passed on without a protocol switch"
        );
        events.push(Event::Head {
            status: response.status().as_u16(),
            version: format!("{:?}", response.version()),
            framing: head.framing,
            keep_alive: head.keep_alive,
            headers: pairs(response.headers()),
        });
        if response.status() == 101 {
            events.push(Event::Stop);
            break;
        }
        let mut reader = BodyReader::new(head.framing);
        let mut body = Vec::new();
        loop {
            match reader.next(&mut buf) {
                Ok(Step::Frame(frame)) => match frame.into_data() {
                    Ok(data) => body.extend_from_slice(&data),
                    Err(frame) => {
                        let trailers = frame.into_trailers().expect("data or trailers");
                        events.push(Event::Body(std::mem::take(&mut body)));
                        events.push(Event::Trailers(pairs(&trailers)));
                    }
                },
                Ok(Step::NeedMore) => {
                    if !feed(&mut buf) {
                        events.push(Event::Body(body));
                        match reader.at_eof() {
                            Ok(()) => events.push(Event::Eof),
                            Err(e) => events.push(Event::Error(e.to_string())),
                        }
                        break 'responses;
                    }
                }
                Ok(Step::End) => break,
                Err(e) => {
                    events.push(Event::Body(body));
                    events.push(Event::Error(e.to_string()));
                    break 'responses;
                }
            }
        }
        assert!(reader.is_done());
        events.push(Event::Body(body));
        if !head.keep_alive {
            events.push(Event::Stop);
            break;
        }
    }
    let mut left = buf.to_vec();
    left.extend_from_slice(rest);
    (events, left)
}

fn pairs(map: &hyper::HeaderMap) -> Vec<(String, Vec<u8>)> {
    map.iter()
        .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec()))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&[flags, a, b, c, d], wire)) = data.split_first_chunk::<5>() else {
        return;
    };
    let method = [Method::GET, Method::HEAD, Method::POST, Method::CONNECT][usize::from(flags & 3)].clone();
    let upgrade = flags & 4 != 0;
    let whole = play(wire, &method, upgrade, None);
    let split = play(
        wire,
        &method,
        upgrade,
        Some(Pieces(u32::from_le_bytes([a, b, c, d]))),
    );
    if let Some(Event::Error(_)) = whole.0.last() {
        // The same error, after the same events; where it stopped reading
        // may differ.
        assert_eq!(whole.0, split.0);
    } else {
        assert_eq!(whole, split);
    }
});
