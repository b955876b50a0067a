//! The verdict on each event of a request, before anything reaches Kafka.
//!
//! In: the raw events of one request, the price book and the clock (`tally rate`'s
//! decoder is made of them), the caller's API key and the largest event a Kafka
//! message can hold. Out: for each event, accept
//! (with the key to produce it under), reject (with the decoder's error, as too large
//! for Kafka, or as a conflicting resend of an earlier event of the same request) or
//! duplicate (of an earlier event of the same request, content and all), an accepted
//! one with why it would bill nothing as the price book stands, if it would;
//! or, when any event names a `source` the key may not use, a refusal of the whole
//! request. Pure: the handler produces what this accepts.

use std::borrow::Cow;
use std::collections::HashMap;

use chrono::{DateTime, Utc};

use tally_schemas::config::{ApiKey, Config};
use tally_schemas::event::{EventDecoder, EventError, Problem};
use tally_schemas::ids::{EventKey, PayloadFingerprint};

use super::unbilled::Unbilled;
use tally_schemas::event::identity;

/// One event and what to do with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict<'a> {
    /// The event as its sender wrote it: what is produced.
    pub bytes: &'a [u8],
    /// Its `id`, when it has one that is a string, to echo in the results.
    pub id: Option<Cow<'a, str>>,
    pub kind: VerdictKind<'a>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum VerdictKind<'a> {
    /// Valid and new in this request: produce, keyed by `subject`. `unbilled` says
    /// why it would bill nothing as the price book stands, if it would (it is stored
    /// all the same).
    Accept {
        subject: Cow<'a, str>,
        unbilled: Option<Unbilled>,
    },
    /// Same `(source, id)` and content as the event at index `of`: not produced again.
    Duplicate { of: usize },
    /// Same `(source, id)` as the event at index `of`, other content: rejected, the
    /// first counts, as the aggregator would have it.
    Conflict { of: usize },
    /// Invalid, as `tally rate` would reject it.
    Reject(EventError),
}

/// An event names a source the key may not send for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forbidden {
    pub index: usize,
    pub source: String,
}

/// Decides every event of a request. Every event whose `source` can be read is checked
/// against the key, valid or not, so a refused source is reported as such rather than
/// as a validation error; an event is accepted only when its source was read and
/// allowed.
pub fn check_events<'a>(
    config: &Config,
    now: DateTime<Utc>,
    key: &ApiKey,
    max_record_bytes: usize,
    events: &[&'a [u8]],
) -> Result<Vec<Verdict<'a>>, Forbidden> {
    let mut verdicts = Vec::with_capacity(events.len());
    let mut first_index: HashMap<EventKey, (usize, PayloadFingerprint)> =
        HashMap::with_capacity(events.len());
    let decoder = EventDecoder::new(config, now);
    let mut looked_up = None;
    for (index, &bytes) in events.iter().enumerate() {
        // The source the aggregator will read, as the decoder reads it; an invalid
        // event's is read apart, where it can be.
        let (decoded, identity) = match decoder.decode_with_identity(bytes) {
            Ok((event, identity)) => (Ok(event), identity),
            Err(error) => (Err(error), identity(bytes)),
        };
        if let Some(source) = &identity.source {
            if !key.may_send(source) {
                return Err(Forbidden {
                    index,
                    source: source.clone().into_owned(),
                });
            }
        }
        let kind = match decoded {
            Err(error) => VerdictKind::Reject(error),
            // Kafka would refuse it on every retry: a 503 would have the sender retry
            // forever, so it is this event's fault, said as such.
            Ok(event) if event.subject.len() + bytes.len() > max_record_bytes => {
                VerdictKind::Reject(EventError {
                    field: "event".to_owned(),
                    problem: Problem::TooLargeForKafka {
                        bytes: event.subject.len() + bytes.len(),
                        limit: max_record_bytes,
                    },
                })
            }
            Ok(event) => {
                // An event no meter reads is neither remembered nor compared, as the
                // aggregator does not remember it either (it bills nothing, whatever
                // its pair).
                let metered = !event.readings.is_empty();
                match first_index.get(&event.key).filter(|_| metered) {
                    Some(&(of, payload)) if payload == event.payload => {
                        VerdictKind::Duplicate { of }
                    }
                    Some(&(of, _)) => VerdictKind::Conflict { of },
                    None => {
                        if metered {
                            first_index.insert(event.key, (index, event.payload));
                        }
                        let unbilled = Unbilled::of(config, &event, now);
                        VerdictKind::Accept {
                            unbilled: unbilled.map(|u| u.suggest(config, &mut looked_up)),
                            subject: event.subject,
                        }
                    }
                }
            }
        };
        verdicts.push(Verdict {
            bytes,
            id: identity.id,
            kind,
        });
    }
    Ok(verdicts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use tally_schemas::config::Config;

    const CONFIG: &str = r#"
[[meters]]
slug = "tokens"
event_type = "llm.tokens"
aggregation = "sum"
value_property = "$.tokens"

[[plans]]
id = "pro"
currency = "usd"

[[plans.prices]]
id = "tokens"
meter = "tokens"
billing_scheme = "per_unit"
unit_amount = "0.001"

[[customers]]
id = "cust_a"
plan = "pro"
"#;

    fn event(id: &str, source: &str, tokens: &str) -> String {
        format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"{source}","type":"llm.tokens","subject":"cust_a","time":"2026-11-02T10:00:00Z","data":{{"tokens":{tokens}}}}}"#
        )
    }

    fn key(sources: Option<&[&str]>) -> ApiKey {
        ApiKey {
            secret: "0123456789abcdef".to_owned(),
            tenant: "t".to_owned(),
            sources: sources.map(|s| s.iter().map(|s| (*s).to_owned()).collect()),
        }
    }

    fn check<'a>(events: &[&'a [u8]], key: &ApiKey) -> Result<Vec<Verdict<'a>>, Forbidden> {
        let config = Config::parse(CONFIG, "test.toml").unwrap();
        let now = Utc.with_ymd_and_hms(2026, 11, 3, 0, 0, 0).unwrap();
        check_events(&config, now, key, 4096, events)
    }

    #[test]
    fn good_bad_and_repeated_events_each_get_their_verdict() {
        let a = event("a", "s", "5");
        let bad = event("b", "s", "-1");
        let again = event("a", "s", "5").replace(",\"", ", \"");
        let other_source = event("a", "t", "5");
        let conflicting = event("a", "s", "6");
        let events = [
            a.as_bytes(),
            bad.as_bytes(),
            again.as_bytes(),
            other_source.as_bytes(),
            conflicting.as_bytes(),
        ];
        let verdicts = check(&events, &key(None)).unwrap();
        let kinds: Vec<_> = verdicts.iter().map(|v| v.kind.clone()).collect();
        assert_eq!(
            kinds,
            vec![
                VerdictKind::Accept {
                    subject: "cust_a".into(),
                    unbilled: None,
                },
                VerdictKind::Reject(EventError {
                    field: "data.tokens".to_owned(),
                    problem: Problem::Negative
                }),
                VerdictKind::Duplicate { of: 0 },
                VerdictKind::Accept {
                    subject: "cust_a".into(),
                    unbilled: None,
                },
                VerdictKind::Conflict { of: 0 },
            ]
        );
        let ids: Vec<_> = verdicts.iter().map(|v| v.id.as_deref()).collect();
        assert_eq!(
            ids,
            vec![Some("a"), Some("b"), Some("a"), Some("a"), Some("a")]
        );
        // A type no meter reads (a typo, say) is stored all the same, and named.
        let typo = a
            .replace("llm.tokens", "llm.tokns")
            .replace("\"a\"", "\"c\"");
        let typo_verdicts = check(&[typo.as_bytes()], &key(None)).unwrap();
        assert_eq!(
            typo_verdicts[0].kind,
            VerdictKind::Accept {
                subject: "cust_a".into(),
                unbilled: Some(Unbilled::UnmeteredType {
                    event_type: "llm.tokns".to_owned()
                }),
            }
        );
        assert_eq!(verdicts[3].bytes, other_source.as_bytes());
    }

    #[test]
    fn only_the_first_unknown_subject_of_a_request_is_matched_to_a_customer() {
        let stranger = |id: &str, subject: &str| event(id, "s", "1").replace("cust_a", subject);
        let events = [
            stranger("a", "cust-a"),
            stranger("b", "cust-a"),
            stranger("c", "CUST_A"),
        ];
        let events: Vec<&[u8]> = events.iter().map(|e| e.as_bytes()).collect();
        let suggested: Vec<Option<String>> = (check(&events, &key(None)).unwrap().into_iter())
            .map(|verdict| match verdict.kind {
                VerdictKind::Accept {
                    unbilled: Some(Unbilled::UnknownCustomer { likely_meant, .. }),
                    ..
                } => likely_meant,
                other => panic!("{other:?}"),
            })
            .collect();
        let cust_a = Some("cust_a".to_owned());
        assert_eq!(suggested, [cust_a.clone(), cust_a, None]);
    }

    #[test]
    fn an_event_too_large_for_a_kafka_message_is_rejected_with_the_limit() {
        let padded = event("big", "s", "1").replacen(
            "{",
            &format!("{{\"note\":\"{}\",", "x".repeat(4096)),
            1,
        );
        let small = event("small", "s", "1");
        let verdicts = check(&[padded.as_bytes(), small.as_bytes()], &key(None)).unwrap();
        assert_eq!(
            verdicts[0].kind,
            VerdictKind::Reject(EventError {
                field: "event".to_owned(),
                problem: Problem::TooLargeForKafka {
                    bytes: padded.len() + "cust_a".len(),
                    limit: 4096
                }
            })
        );
        assert!(matches!(verdicts[1].kind, VerdictKind::Accept { .. }));
    }

    #[test]
    fn a_rejected_event_does_not_make_a_later_one_a_duplicate() {
        let bad = event("a", "s", "\"x\"");
        let good = event("a", "s", "1");
        let verdicts = check(&[bad.as_bytes(), good.as_bytes()], &key(None)).unwrap();
        assert!(matches!(verdicts[0].kind, VerdictKind::Reject(_)));
        assert!(matches!(verdicts[1].kind, VerdictKind::Accept { .. }));
    }

    #[test]
    fn an_unmetered_event_is_neither_remembered_nor_compared_as_the_aggregator_does() {
        let unmetered = event("a", "s", "5").replace("llm.tokens", "ai.feedback");
        let metered = event("a", "s", "5");
        let verdicts = check(
            &[
                unmetered.as_bytes(),
                metered.as_bytes(),
                unmetered.as_bytes(),
            ],
            &key(None),
        )
        .unwrap();
        assert!(verdicts
            .iter()
            .all(|v| matches!(v.kind, VerdictKind::Accept { .. })));
    }

    #[test]
    fn any_event_with_a_source_the_key_may_not_use_refuses_the_request() {
        let allowed = event("a", "agent", "1");
        let refused = event("b", "billing", "1");
        let key = key(Some(&["agent"]));
        assert_eq!(
            check(&[allowed.as_bytes(), refused.as_bytes()], &key),
            Err(Forbidden {
                index: 1,
                source: "billing".to_owned()
            })
        );
        // Even when the event would have been rejected for another reason.
        let refused_and_bad = event("c", "billing", "-5");
        assert_eq!(
            check(&[refused_and_bad.as_bytes()], &key)
                .unwrap_err()
                .index,
            0
        );
    }

    #[test]
    fn an_event_without_a_readable_source_is_rejected_not_produced() {
        let key = key(Some(&["agent"]));
        let verdicts = check(
            &[br#"{"specversion":"1.0","id":"a","source":7}"#.as_slice()],
            &key,
        )
        .unwrap();
        match &verdicts[0].kind {
            VerdictKind::Reject(e) => assert_eq!(e.field, "source"),
            other => panic!("expected a reject, got {other:?}"),
        }
    }
}
