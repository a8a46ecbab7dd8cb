//! The chunked decoder (`wire::ChunkedDecoder`) on arbitrary bytes in
//! arbitrary pieces (the first four bytes seed the piece sizes): the same
//! outcome as from a single read, and what it decodes, encoded again with
//! `chunk_line` and `last_chunk`, decodes to the same.
#![no_main]

use bytes::BytesMut;
use interlude::proxy::http::wire::{ChunkedDecoder, Decoded, chunk_line, last_chunk};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq)]
struct Outcome {
    data: Vec<u8>,
    trailers: Option<hyper::HeaderMap>,
    /// `Ok(true)`: the body ended; `Ok(false)`: the input ran out first.
    result: Result<bool, String>,
    /// Data frames handed out: never an empty one.
    empty_frames: usize,
}

fn decode(wire: &[u8], mut seed: Option<u32>) -> (Outcome, Vec<u8>) {
    let mut decoder = ChunkedDecoder::default();
    let mut buf = BytesMut::new();
    let mut rest = wire;
    let mut outcome = Outcome {
        data: Vec::new(),
        trailers: None,
        result: Ok(false),
        empty_frames: 0,
    };
    loop {
        match decoder.decode(&mut buf) {
            Ok(Decoded::Data(data)) => {
                outcome.empty_frames += usize::from(data.is_empty());
                outcome.data.extend_from_slice(&data);
            }
            Ok(Decoded::Trailers(map)) => outcome.trailers = Some(map),
            Ok(Decoded::End) => {
                outcome.result = Ok(true);
                break;
            }
            Ok(Decoded::NeedMore) => {
                if rest.is_empty() {
                    break;
                }
                let n = match seed.as_mut() {
                    None => rest.len(),
                    Some(x) => {
                        *x ^= *x << 13;
                        *x ^= *x >> 17;
                        *x ^= *x << 5;
                        (*x as usize >> 4) % 24 + 1
                    }
                };
                let n = n.min(rest.len());
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
            }
            Err(e) => {
                outcome.result = Err(e.to_string());
                break;
            }
        }
    }
    let mut left = buf.to_vec();
    left.extend_from_slice(rest);
    (outcome, left)
}

fuzz_target!(|data: &[u8]| {
    let Some((seed, wire)) = data.split_first_chunk::<4>() else {
        return;
    };
    let whole = decode(wire, None);
    let split = decode(wire, Some(u32::from_le_bytes(*seed).max(1)));
    assert_eq!(whole.0.empty_frames, 0, "an empty data frame");
    if whole.0.result.is_err() {
        assert_eq!(whole.0, split.0);
    } else {
        assert_eq!(whole, split);
    }
    if whole.0.result == Ok(true) {
        // Encode what came out as one chunk, and end it as the proxy does.
        let mut again = Vec::new();
        if !whole.0.data.is_empty() {
            let (line, used) = chunk_line(whole.0.data.len());
            again.extend_from_slice(&line[..used]);
            again.extend_from_slice(&whole.0.data);
            again.extend_from_slice(b"\r\n");
        }
        again.extend_from_slice(&last_chunk(whole.0.trailers.as_ref()));
        let (round, left) = decode(&again, None);
        assert_eq!(round.result, Ok(true), "{:?}", String::from_utf8_lossy(&again));
        assert_eq!(round.data, whole.0.data);
        let trailers = whole.0.trailers.filter(|t| !t.is_empty());
        assert_eq!(round.trailers.filter(|t| !t.is_empty()), trailers);
        assert!(left.is_empty());
    }
});
