//! State migrations and how they chain.

/// One step of state migration, `from` one state version `to` another
/// (up or down).
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub from: u32,
    pub to: u32,
    pub run: fn(&[u8]) -> Result<Vec<u8>, String>,
}

/// The shortest chain of migrations from `from` to `to`, or `None` when
/// there is none. An empty chain when the versions are equal.
pub fn find_path(migrations: &[Migration], from: u32, to: u32) -> Option<Vec<Migration>> {
    // Breadth-first over state versions; the lists are a handful long.
    let mut frontier: Vec<(u32, Vec<Migration>)> = vec![(from, Vec::new())];
    let mut seen = vec![from];
    while !frontier.is_empty() {
        let mut next = Vec::new();
        for (version, path) in frontier {
            if version == to {
                return Some(path);
            }
            for m in migrations.iter().filter(|m| m.from == version) {
                if !seen.contains(&m.to) {
                    seen.push(m.to);
                    let mut longer = path.clone();
                    longer.push(*m);
                    next.push((m.to, longer));
                }
            }
        }
        frontier = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(state: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = state.to_vec();
        out.push(b'+');
        Ok(out)
    }

    const CHAIN: &[Migration] = &[
        Migration {
            from: 1,
            to: 2,
            run: tag,
        },
        Migration {
            from: 2,
            to: 3,
            run: tag,
        },
        Migration {
            from: 3,
            to: 2,
            run: tag,
        },
    ];

    #[test]
    fn chains_steps_up() {
        let path = find_path(CHAIN, 1, 3).expect("a path from 1 to 3");
        assert_eq!(
            path.iter().map(|m| (m.from, m.to)).collect::<Vec<_>>(),
            [(1, 2), (2, 3)]
        );
    }

    #[test]
    fn no_path_down_past_what_is_written() {
        assert!(find_path(CHAIN, 3, 1).is_none());
        assert_eq!(find_path(CHAIN, 3, 2).map(|p| p.len()), Some(1));
    }

    #[test]
    fn same_version_is_an_empty_path() {
        assert_eq!(find_path(CHAIN, 2, 2).map(|p| p.len()), Some(0));
    }
}
