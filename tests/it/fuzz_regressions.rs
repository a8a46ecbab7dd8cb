//! What the fuzz targets (fuzz/, see README "Fuzzing") found, replayed
//! through the same library functions, so a finding stays fixed. Inputs too
//! long to write inline are in tests/it/fuzz_inputs/, as libFuzzer saved them.

use bytes::BytesMut;
use hyper::Method;
use interlude::proxy::http::wire::{ChunkedDecoder, Decoded, Parsed, parse_response_head};

/// A chunked body decoded from `wire`, fed `piece` bytes at a time: the
/// data, and whether it ended (`Ok(true)`), ran out (`Ok(false)`) or failed.
fn dechunk(wire: &[u8], piece: usize) -> (Vec<u8>, Result<bool, String>) {
    let mut decoder = ChunkedDecoder::default();
    let (mut buf, mut rest, mut data) = (BytesMut::new(), wire, Vec::new());
    loop {
        match decoder.decode(&mut buf) {
            Ok(Decoded::Data(bytes)) => data.extend_from_slice(&bytes),
            Ok(Decoded::Trailers(_)) => {}
            Ok(Decoded::End) => return (data, Ok(true)),
            Ok(Decoded::NeedMore) if rest.is_empty() => return (data, Ok(false)),
            Ok(Decoded::NeedMore) => {
                let n = piece.min(rest.len());
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
            }
            Err(e) => return (data, Err(e.to_string())),
        }
    }
}

/// fuzz target `chunked`: a chunk-size line longer than the limit (4096
/// bytes, here with an extension full of odd bytes) was refused when it
/// came in pieces but accepted when one read brought all of it.
#[test]
fn a_chunk_size_line_over_the_limit_is_refused_however_it_arrives() {
    let found = std::fs::read("tests/it/fuzz_inputs/chunked-long-line-in-one-read").expect("input");
    // The target's first four bytes seed its piece sizes; the body follows.
    let wire = &found[4..];
    let whole = dechunk(wire, usize::MAX);
    assert_eq!(whole.1, Err("chunk-size line too long".to_string()));
    for piece in [1, 7, 100, 4096] {
        assert_eq!(dechunk(wire, piece), whole, "in pieces of {piece}");
    }
    let mut long = format!("1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(5000)).into_bytes();
    assert_eq!(
        dechunk(&long, usize::MAX).1,
        Err("chunk-size line too long".to_string())
    );
    // At the limit (the line with its CRLF) it is still a chunk.
    long = format!("1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(4096 - 4)).into_bytes();
    assert_eq!(dechunk(&long, usize::MAX), (b"x".to_vec(), Ok(true)));
}

/// fuzz target `chunked`, after the first fix: a line past the limit with
/// a malformed byte beyond the limit was "invalid chunk size" from one
/// read and "too long" in pieces; only the limit's bytes are parsed now.
#[test]
fn what_lies_past_the_chunk_line_limit_does_not_change_the_error() {
    let found = std::fs::read("tests/it/fuzz_inputs/chunked-error-past-the-line-limit").expect("input");
    let wire = &found[4..];
    let whole = dechunk(wire, usize::MAX);
    assert_eq!(whole.1, Err("chunk-size line too long".to_string()));
    for piece in [1, 13, 4095, 4096, 4097] {
        assert_eq!(dechunk(wire, piece), whole, "in pieces of {piece}");
    }
}

/// The same for a response head (found reading the chunked decoder's):
/// bytes past the 64 KiB limit, malformed or not, give the same error.
#[test]
fn what_lies_past_the_response_head_limit_does_not_change_the_error() {
    let head = format!(
        "HTTP/1.1 200 OK\r\nx-long: {}\r\n\0bad\r\n\r\n",
        "a".repeat(64 * 1024 - 20)
    );
    let error = |bytes: &[u8]| match parse_response_head(&mut BytesMut::from(bytes), &Method::GET, false) {
        Err(e) => e.to_string(),
        Ok(Parsed::Partial) => "partial".into(),
        Ok(other) => format!("{other:?}"),
    };
    assert_eq!(error(head.as_bytes()), "response head longer than 65536 bytes");
    assert_eq!(
        error(&head.as_bytes()[..64 * 1024]),
        "response head longer than 65536 bytes"
    );
    assert_eq!(error(&head.as_bytes()[..64 * 1024 - 1]), "partial");
}

/// Found with the chunk-size line: trailers longer than the 64 KiB limit
/// were accepted from a single read only.
#[test]
fn trailers_over_the_limit_are_refused_however_they_arrive() {
    let wire = format!("0\r\nx-long: {}\r\n\r\n", "a".repeat(64 * 1024)).into_bytes();
    let whole = dechunk(&wire, usize::MAX);
    assert_eq!(whole.1, Err("trailer section too long".to_string()));
    assert_eq!(dechunk(&wire, 1000), whole);
}
