//! The PROXY protocol decoder (`sockets::proxy_protocol::parse`) on
//! arbitrary bytes: it never panics, a header it accepts is no longer than
//! the input and within the v1/v2 bounds, `Need` never asks past the
//! header (feeding it exactly what it asks ends where a whole-input parse
//! does), and a decoded address header encodes back to one that decodes
//! the same.
#![no_main]

use interlude::sockets::proxy_protocol::{Header, Parsed, V1_MAX_LEN, V2_MAX_LEN, Version, encode, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    if let Ok(Parsed::Done { header, len }) = &whole {
        assert!(*len <= data.len() && *len <= V2_MAX_LEN.max(V1_MAX_LEN));
        if let Header::Inet { source, destination } = header {
            for version in [Version::V1, Version::V2] {
                let again = encode(version, Some((*source, *destination)));
                match parse(again.as_bytes()) {
                    Ok(Parsed::Done { header: back, .. }) => assert_eq!(back, *header),
                    other => panic!("re-encoded header did not decode: {other:?}"),
                }
            }
        }
    }
    // Byte-exact reading: take what `Need` asks, no more.
    let mut have = 0;
    loop {
        match parse(&data[..have]) {
            Ok(Parsed::Need(more)) => {
                assert!(more >= 1);
                if have + more > data.len() {
                    break;
                }
                have += more;
            }
            Ok(Parsed::Done { len, .. }) => {
                assert_eq!(len, have, "a header read in steps ended past its length");
                assert!(matches!(whole, Ok(Parsed::Done { len: whole_len, .. }) if whole_len == len));
                break;
            }
            Err(_) => break,
        }
    }
});
