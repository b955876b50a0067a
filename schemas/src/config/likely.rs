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
/// `-` for `_` or surrounding spaces, or else the one nearest within two edits (and a
/// quarter of its length, so short ids are not matched to anything, and `cust_x0`
/// is not taken for `cust_jp`).
pub fn likely_meant<'a>(asked: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let normal = |id: &str| -> Vec<char> {
        (id.trim().chars())
            .map(|c| match c {
                '-' | ' ' => '_',
                c => c.to_ascii_lowercase(),
            })
            .collect()
    };
    let asked = normal(asked);
    let limit = (asked.len() / 4).min(2);
    let mut best: Option<(usize, &str)> = None;
    let mut tied = false;
    for id in known {
        let distance = edit_distance(&asked, &normal(id));
        match best {
            _ if distance > limit => {}
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

/// Levenshtein distance: insertions, deletions and substitutions.
fn edit_distance(a: &[char], b: &[char]) -> usize {
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
    }
}
