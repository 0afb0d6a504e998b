//! Fuzzing the knowns parsers (proptest, a bounded number of cases so CI time is bounded):
//! arbitrary bytes in any of the three formats never panic, and a JSON Lines file of good and
//! spoiled records keeps every good record and names every spoiled one by its position,
//! losing nothing else.

use bytes::Bytes;
use common::dataset_formats::parse_knowns;
use proptest::prelude::*;

proptest! {
    // 1000 cases in CI (bounded time); CT_FUZZ_CASES runs more.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("CT_FUZZ_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(1000)
    ))]

    #[test]
    fn arbitrary_bytes_are_an_answer_not_a_crash(
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
        name in prop_oneof![Just("k.json"), Just("k.jsonl"), Just("k.parquet")],
    ) {
        let _ = parse_knowns(name, &Bytes::from(bytes));
    }

    #[test]
    fn arbitrary_json_values_are_an_answer_not_a_crash(
        records in proptest::collection::vec(json_value(), 0..6),
    ) {
        let text = serde_json::Value::Array(records).to_string();
        let _ = parse_knowns("k.json", &Bytes::from(text));
    }

    #[test]
    fn every_good_record_is_kept_and_every_spoiled_one_named(
        spoils in proptest::collection::vec(proptest::option::of(0usize..9), 1..12),
    ) {
        let mut lines = Vec::new();
        for (i, spoil) in spoils.iter().enumerate() {
            lines.push(record(i as u64, *spoil));
        }
        let knowns = parse_knowns("k.jsonl", &Bytes::from(lines.join(&b"\n"[..])));
        let knowns = match knowns {
            Ok(k) => k,
            Err(e) => return Err(TestCaseError::fail(format!("a file of records failed whole: {e}"))),
        };
        for (i, spoil) in spoils.iter().enumerate() {
            match spoil {
                None => prop_assert!(
                    knowns.facts.iter().zip(&knowns.positions).any(|(f, &p)| p == i && f.known_id == i as u64),
                    "good record {} lost", i
                ),
                Some(s) => {
                    let (says, id_readable) = spoiled_field(*s);
                    let error = knowns.errors.iter().find(|e| e.index == i);
                    prop_assert!(
                        error.is_some_and(|e| e.message.contains(says)),
                        "spoiled record {} (spoil {}) not named with {:?}: {:?}", i, s, says, knowns.errors
                    );
                    // Where the record's id survived the spoiling, the error carries it too.
                    if id_readable {
                        prop_assert_eq!(error.and_then(|e| e.known_id), Some(i as u64));
                    }
                }
            }
        }
        prop_assert_eq!(knowns.facts.len() + knowns.errors.len(), spoils.len());
    }
}

/// Small arbitrary JSON: the shapes a broken dataset has (wrong types, nesting, nulls).
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        "[a-zA-Z ]{0,8}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            proptest::collection::vec(
                (
                    prop_oneof![
                        Just("known_id"),
                        Just("subject"),
                        Just("prompt"),
                        Just("attribute"),
                        Just("x")
                    ],
                    inner
                ),
                0..5
            )
            .prop_map(|kv| serde_json::Value::Object(
                kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            )),
        ]
    })
}

/// What the error of a record spoiled by `record(_, Some(spoil))` must say: the field spoiled,
/// or, where no field is to blame, what the line is instead of a record. Also whether the
/// spoiled record still has a readable `known_id`.
fn spoiled_field(spoil: usize) -> (&'static str, bool) {
    match spoil {
        0 | 1 => ("not JSON", false),
        2 => ("`subject`", true),
        3 => ("`attribute`", true),
        4 => ("`prompt`", true),
        5 => ("`subject`", true),
        6 => ("`known_id`", false),
        7 => ("not a JSON object", false),
        _ => ("`known_id`", false),
    }
}

/// Record `id` as one JSON Lines line, good or with one defect.
fn record(id: u64, spoil: Option<usize>) -> Vec<u8> {
    let mut r = serde_json::json!({
        "known_id": id, "subject": "Paris", "attribute": "France",
        "prompt": "Paris is the capital of", "relation_id": "P1",
    });
    let line = match spoil {
        None => return r.to_string().into_bytes(),
        Some(0) => return b"{\"known_id\": 3, \"subject\": ".to_vec(), // truncated JSON
        Some(1) => return b"\xff\xfe not UTF-8".to_vec(),
        Some(2) => {
            r.as_object_mut().map(|o| o.remove("subject"));
            r
        }
        Some(3) => {
            r["attribute"] = serde_json::json!(42);
            r
        }
        Some(4) => {
            r["prompt"] = serde_json::json!("");
            r
        }
        Some(5) => {
            r["subject"] = serde_json::json!("Rome");
            r
        }
        Some(6) => {
            r["known_id"] = serde_json::json!("seven");
            r
        }
        Some(7) => serde_json::json!([1, 2, 3]),
        Some(_) => {
            r["known_id"] = serde_json::json!(-1);
            r
        }
    };
    line.to_string().into_bytes()
}
