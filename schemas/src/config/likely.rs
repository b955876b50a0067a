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
/// `-` or a space for `_`, or surrounding spaces, or else the one nearest within two
/// edits, a swap of neighbours counting as one (and a quarter of its length, so short
/// ids are not matched to anything, and `cust_x0` is not taken for `cust_jp`). Linear
/// in the book: an id whose length is further off than the edits allowed is passed
/// over by its length alone, so a sender's long unknown subject costs one pass over
/// the ids, not a distance to each.
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

/// The last three rows of an edit table, kept between ids.
#[derive(Debug, Default)]
struct EditRows {
    before: Vec<usize>,
    previous: Vec<usize>,
    current: Vec<usize>,
}

impl EditRows {
    /// The edit distance of `a` and `b` if it is at most `limit`; `None` as soon as
    /// every path is over it. Edits are insertions, deletions, substitutions and swaps
    /// of two neighbours (the optimal string alignment distance), as `thruogh` is one
    /// slip of `through`, not two.
    fn distance_within(&mut self, a: &[char], b: &[char], limit: usize) -> Option<usize> {
        let (before, previous, current) = (&mut self.before, &mut self.previous, &mut self.current);
        previous.clear();
        previous.extend(0..=b.len());
        for (i, ca) in a.iter().enumerate() {
            current.clear();
            current.push(i + 1);
            for (j, cb) in b.iter().enumerate() {
                let substitute = previous[j] + usize::from(ca != cb);
                let mut least = substitute.min(previous[j + 1] + 1).min(current[j] + 1);
                if i > 0 && j > 0 && a[i - 1] == *cb && *ca == b[j - 1] {
                    least = least.min(before[j - 1] + 1);
                }
                current.push(least);
            }
            // Every later cell is at least this row's least value: no cell is below
            // the one diagonally above it (a row's first is its number), and a swap
            // adds one to a cell of the row above, at most one below this row's least.
            if current.iter().min().is_some_and(|least| *least > limit) {
                return None;
            }
            std::mem::swap(before, previous);
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
        assert_eq!(meant("acme_es"), Some("acme_se"));
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
    fn the_distance_within_a_limit_counts_a_swap_of_neighbours_as_one_edit_or_is_none() {
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
        assert_eq!(within("thruogh", "through", 1), Some(1));
        assert_eq!(within("ab", "ba", 0), None);
        // A swap is of neighbours only, and each character is edited once.
        assert_eq!(within("abc", "cba", 3), Some(2));
        assert_eq!(within("ca", "abc", 3), Some(3));
    }

    /// The optimal string alignment distance by the whole table, as textbooks write
    /// it: what the bounded one must agree with.
    fn full_distance(a: &[char], b: &[char]) -> usize {
        let mut table = vec![vec![0; b.len() + 1]; a.len() + 1];
        for (i, row) in table.iter_mut().enumerate() {
            row[0] = i;
        }
        for (j, cell) in table[0].iter_mut().enumerate() {
            *cell = j;
        }
        for i in 1..=a.len() {
            for j in 1..=b.len() {
                let cost = usize::from(a[i - 1] != b[j - 1]);
                let mut d = (table[i - 1][j - 1] + cost)
                    .min(table[i - 1][j] + 1)
                    .min(table[i][j - 1] + 1);
                if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                    d = d.min(table[i - 2][j - 2] + 1);
                }
                table[i][j] = d;
            }
        }
        table[a.len()][b.len()]
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
