//! Which customer of the price book a mistyped id likely meant, for the messages that
//! name an unknown customer (ingest's warnings, `tally rate`'s summary, `tally
//! explain`), and which pipeline a mistyped topic prefix did.

use super::Config;

impl Config {
    /// The customer id `asked` is most likely a slip of, if there is one
    /// ([`likely_meant`]).
    pub fn likely_customer(&self, asked: &str) -> Option<&str> {
        likely_meant(asked, self.customers.keys().map(String::as_str))
    }
}

/// The one id of `known` that `asked` is most likely a slip of: the same but for case,
/// `-` or a space for `_`, or surrounding spaces, or else the one nearest within two edits (and a
/// quarter of its length, so short ids are not matched to anything, and `cust_x0`
/// is not taken for `cust_jp`). Linear in the book: an id whose length is further off
/// than the edits allowed is passed over by its length alone, so a sender's long
/// unknown subject costs one pass over the ids, not a distance to each.
pub fn likely_meant<'a>(asked: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let mut asked_normal = Vec::new();
    normal(asked, &mut asked_normal);
    let limit = (asked_normal.len() / 4).min(2);
    let (mut id_normal, mut rows) = (Vec::new(), EditRows::default());
    let mut best: Option<(usize, &str)> = None;
    let mut tied = false;
    for id in known {
        if id.trim().chars().count().abs_diff(asked_normal.len()) > limit {
            continue;
        }
        normal(id, &mut id_normal);
        let Some(distance) = rows.distance_within(&asked_normal, &id_normal, limit) else {
            continue;
        };
        match best {
            Some((nearest, _)) if distance > nearest => {}
            Some((nearest, _)) if distance == nearest => tied = true,
            _ => {
                best = Some((distance, id));
                tied = false;
            }
        }
    }
    best.filter(|_| !tied).map(|(_, id)| id)
}

/// `id` as compared, into `into`: trimmed, lower case, `-` and spaces as `_`; one
/// character for each of the trimmed id's.
fn normal(id: &str, into: &mut Vec<char>) {
    into.clear();
    into.extend(id.trim().chars().map(|c| match c {
        '-' | ' ' => '_',
        c => c.to_ascii_lowercase(),
    }));
}

/// The two rows of a Levenshtein table, kept between ids.
#[derive(Debug, Default)]
struct EditRows {
    previous: Vec<usize>,
    current: Vec<usize>,
}

impl EditRows {
    /// The Levenshtein distance (insertions, deletions and substitutions) of `a` and
    /// `b` if it is at most `limit`; `None` as soon as every path is over it.
    fn distance_within(&mut self, a: &[char], b: &[char], limit: usize) -> Option<usize> {
        let (previous, current) = (&mut self.previous, &mut self.current);
        previous.clear();
        previous.extend(0..=b.len());
        for (i, ca) in a.iter().enumerate() {
            current.clear();
            current.push(i + 1);
            for (j, cb) in b.iter().enumerate() {
                let substitute = previous[j] + usize::from(ca != cb);
                current.push(substitute.min(previous[j + 1] + 1).min(current[j] + 1));
            }
            // A row's least value never falls in the rows below it.
            if current.iter().min().is_some_and(|least| *least > limit) {
                return None;
            }
            std::mem::swap(previous, current);
        }
        Some(previous[b.len()]).filter(|distance| *distance <= limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mistyped_customer_id_is_matched_to_the_one_it_likely_meant() {
        let known = ["initech_us", "initech_uk", "acme_se", "globex_de", "ab"];
        let meant = |asked: &str| likely_meant(asked, known.iter().copied());
        assert_eq!(meant("initech-us"), Some("initech_us"));
        assert_eq!(meant(" Initech_US "), Some("initech_us"));
        assert_eq!(meant("acme_sw"), Some("acme_se"));
        assert_eq!(meant("globex_deu"), Some("globex_de"));
        // Nearest to two alike: no guess.
        assert_eq!(meant("initech_u"), None);
        // Too far, or too short to tell.
        assert_eq!(meant("umbrella"), None);
        assert_eq!(meant("acme_xy"), None);
        assert_eq!(meant("ax"), None);
        // A sender's long subject is nobody's slip.
        assert_eq!(meant(&"initech_us".repeat(50_000)), None);
    }

    #[test]
    fn the_distance_within_a_limit_is_levenshteins_or_none() {
        let chars = |s: &str| s.chars().collect::<Vec<char>>();
        let mut rows = EditRows::default();
        let mut within =
            |a: &str, b: &str, limit| rows.distance_within(&chars(a), &chars(b), limit);
        assert_eq!(within("kitten", "sitting", 3), Some(3));
        assert_eq!(within("kitten", "sitting", 2), None);
        assert_eq!(within("acme_se", "acme_se", 0), Some(0));
        assert_eq!(within("", "ab", 2), Some(2));
        assert_eq!(within("abcd", "", 3), None);
        assert_eq!(within("flaw", "lawn", 2), Some(2));
    }

    /// Levenshtein distance by the whole table: what the bounded one must agree with.
    fn full_distance(a: &[char], b: &[char]) -> usize {
        let mut previous: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.iter().enumerate() {
            let mut current = vec![i + 1];
            for (j, cb) in b.iter().enumerate() {
                let substitute = previous[j] + usize::from(ca != cb);
                current.push(substitute.min(previous[j + 1] + 1).min(current[j] + 1));
            }
            previous = current;
        }
        previous[b.len()]
    }

    /// `likely_meant` as it was before the length filter and the bounded distance.
    fn likely_meant_by_whole_tables<'a>(asked: &str, known: &[&'a str]) -> Option<&'a str> {
        let normal = |id: &str| {
            let mut chars = Vec::new();
            normal(id, &mut chars);
            chars
        };
        let asked = normal(asked);
        let limit = (asked.len() / 4).min(2);
        let mut distances: Vec<(usize, &str)> = (known.iter())
            .map(|id| (full_distance(&asked, &normal(id)), *id))
            .filter(|(distance, _)| *distance <= limit)
            .collect();
        distances.sort_by_key(|(distance, _)| *distance);
        match distances.as_slice() {
            [(nearest, id), rest @ ..] if rest.first().is_none_or(|(d, _)| d > nearest) => Some(id),
            _ => None,
        }
    }

    #[test]
    fn an_id_is_compared_trimmed_in_lower_case_with_dashes_and_spaces_as_underscores() {
        let mut normalised = Vec::new();
        normal("  Cust-Acme EU\t", &mut normalised);
        assert_eq!(normalised.iter().collect::<String>(), "cust_acme_eu");
    }

    proptest::proptest! {
        #[test]
        fn a_guess_is_the_one_the_whole_tables_give(
            asked in "[aB_ -]{0,10}",
            known in proptest::collection::vec("[aB_ -]{0,10}", 0..8),
        ) {
            let known: Vec<&str> = known.iter().map(String::as_str).collect();
            proptest::prop_assert_eq!(
                likely_meant(&asked, known.iter().copied()),
                likely_meant_by_whole_tables(&asked, &known)
            );
        }

        #[test]
        fn the_bounded_distance_agrees_with_the_whole_table(
            a in "[ab_-]{0,9}",
            b in "[ab_-]{0,9}",
            limit in 0usize..4,
        ) {
            let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
            let full = full_distance(&a, &b);
            let bounded = EditRows::default().distance_within(&a, &b, limit);
            proptest::prop_assert_eq!(bounded, Some(full).filter(|d| *d <= limit));
        }
    }
}
