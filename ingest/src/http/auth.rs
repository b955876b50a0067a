//! Who is sending: the API key of a request, checked against `[ingest] api_keys`.
//!
//! A key travels as `Authorization: Bearer <key>` or as `X-Api-Key: <key>`. It is
//! compared with every configured key in time that depends on the lengths only, never
//! on how many leading bytes match, and every key is compared, so timing tells nothing
//! about which key came close. Keys are never logged: callers log the key's tenant.

use std::sync::Arc;

use axum::http::{header, HeaderMap};
use tally_schemas::config::ApiKey;

/// The configured keys.
#[derive(Debug)]
pub struct ApiKeys {
    keys: Vec<Arc<ApiKey>>,
}

/// A configured key that matched, by its index in `[ingest] api_keys`. Its own, so a
/// request keeps the key it was admitted with while the keys are reloaded.
#[derive(Debug, Clone)]
pub struct Caller {
    pub index: usize,
    pub key: Arc<ApiKey>,
}

impl ApiKeys {
    pub fn new(keys: Vec<ApiKey>) -> Self {
        ApiKeys {
            keys: keys.into_iter().map(Arc::new).collect(),
        }
    }

    /// The key the request presents, if it is a configured one.
    pub fn authenticate(&self, headers: &HeaderMap) -> Option<Caller> {
        let presented = presented_key(headers)?;
        let mut found = None;
        for (index, key) in self.keys.iter().enumerate() {
            if constant_time_eq(presented, key.secret.as_bytes()) {
                found = Some(Caller {
                    index,
                    key: Arc::clone(key),
                });
            }
        }
        found
    }
}

/// The key in `Authorization: Bearer <key>` (scheme case-insensitive), else in
/// `X-Api-Key`: the two are alternatives, so an `Authorization` header of another
/// scheme (a gateway's Basic credentials, say) leaves `X-Api-Key` to present the key.
pub fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.as_bytes();
        let scheme = b"bearer ";
        if value.len() > scheme.len() && value[..scheme.len()].eq_ignore_ascii_case(scheme) {
            let key = value[scheme.len()..].trim_ascii();
            return (!key.is_empty()).then_some(key);
        }
    }
    let key = headers.get("x-api-key")?.as_bytes().trim_ascii();
    (!key.is_empty()).then_some(key)
}

/// Why a request has no valid key, for its 401: never the key itself.
pub fn why_unauthorized(headers: &HeaderMap) -> &'static str {
    match presented_key(headers) {
        Some(_) => "the API key sent is not one of the configured keys (rotated, or mistyped?)",
        None if headers.contains_key(header::AUTHORIZATION) => {
            "the Authorization header is not `Bearer <key>` (is the `Bearer ` before the key missing?)"
        }
        None => "no API key was sent",
    }
}

/// Whether `presented` equals `secret`, in time that depends on `presented`'s length
/// only: every byte is compared and differences are accumulated, never branched on.
fn constant_time_eq(presented: &[u8], secret: &[u8]) -> bool {
    let mut difference = usize::from(presented.len() != secret.len());
    for (i, &byte) in presented.iter().enumerate() {
        let expected = secret.get(i).copied().unwrap_or(!byte);
        difference |= usize::from(byte ^ expected);
    }
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn key(secret: &str, tenant: &str) -> ApiKey {
        ApiKey {
            secret: secret.to_owned(),
            tenant: tenant.to_owned(),
            sources: None,
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn equal_keys_match_and_any_difference_does_not() {
        assert!(constant_time_eq(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdeF", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcde", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdef0", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"", b"0123456789abcdef"));
    }

    #[test]
    fn the_key_comes_from_bearer_or_x_api_key() {
        let bearer = headers(&[("authorization", "Bearer  k-1 ")]);
        assert_eq!(presented_key(&bearer), Some(b"k-1".as_slice()));
        let lower = headers(&[("authorization", "bearer k-2")]);
        assert_eq!(presented_key(&lower), Some(b"k-2".as_slice()));
        let x = headers(&[("x-api-key", "k-3")]);
        assert_eq!(presented_key(&x), Some(b"k-3".as_slice()));
        // Another scheme's credentials (a gateway's) leave the key to X-Api-Key.
        let behind_a_gateway = headers(&[
            ("authorization", "Basic dXNlcjpwYXNz"),
            ("x-api-key", "k-4"),
        ]);
        assert_eq!(presented_key(&behind_a_gateway), Some(b"k-4".as_slice()));
        for none in [
            headers(&[]),
            headers(&[("authorization", "Basic dXNlcjpwYXNz")]),
            headers(&[("authorization", "Bearer ")]),
            headers(&[("authorization", "Bearer")]),
            headers(&[("x-api-key", " ")]),
        ] {
            assert_eq!(presented_key(&none), None, "{none:?}");
        }
    }

    #[test]
    fn authenticate_finds_the_matching_key_by_index() {
        let keys = ApiKeys::new(vec![
            key("aaaaaaaaaaaaaaaa", "one"),
            key("bbbbbbbbbbbbbbbb", "two"),
        ]);
        let caller = keys
            .authenticate(&headers(&[("x-api-key", "bbbbbbbbbbbbbbbb")]))
            .unwrap();
        assert_eq!((caller.index, caller.key.tenant.as_str()), (1, "two"));
        assert!(keys
            .authenticate(&headers(&[("authorization", "Bearer cccccccccccccccc")]))
            .is_none());
        assert!(keys.authenticate(&headers(&[])).is_none());
        assert!(ApiKeys::new(Vec::new())
            .authenticate(&headers(&[("x-api-key", "aaaaaaaaaaaaaaaa")]))
            .is_none());
    }
}
