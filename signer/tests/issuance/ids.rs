//! SPIFFE ID parsing: accepted forms and one rejected case per rule.

use signet::spiffe::{SpiffeId, TrustDomain};

#[test]
fn valid_ids_parse_and_split() {
    let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/web-1_a.b").unwrap();
    assert_eq!(id.trust_domain_name(), "example.org");
    assert_eq!(id.path(), "/ns/prod/sa/web-1_a.b");
    assert!(!id.is_trust_domain_id());
    let root = SpiffeId::parse("spiffe://a-b_c.9").unwrap();
    assert!(root.is_trust_domain_id());
    assert_eq!(
        TrustDomain::parse("spiffe://example.org").unwrap().as_str(),
        "example.org"
    );
    assert_eq!(
        TrustDomain::parse("example.org").unwrap().id().as_str(),
        "spiffe://example.org"
    );
    // Dots inside a segment are fine; only "." and ".." segments are not.
    SpiffeId::parse("spiffe://example.org/.../a..b/.x").unwrap();
    // Exactly 2048 bytes is allowed.
    let long = format!(
        "spiffe://example.org/{}",
        "a".repeat(2048 - "spiffe://example.org/".len())
    );
    assert_eq!(long.len(), 2048);
    SpiffeId::parse(&long).unwrap();
    // Every accepted ID is accepted by the spiffe crate too.
    for s in [
        "spiffe://example.org/ns/prod/sa/web-1_a.b",
        "spiffe://a-b_c.9",
        long.as_str(),
    ] {
        spiffe::SpiffeId::new(s).unwrap();
    }
}
