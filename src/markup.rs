//! Text put into XML and HTML: the admin API's XML answers, the page at `/`, XSPF playlists. What
//! a source or anyone holding its password sent (stream names, titles, mount paths) stays text
//! there, whatever it holds.

/// Appends `text` to `out` with the five characters that mean something in markup as character
/// references: safe inside elements and quoted attributes, in XML and in HTML alike (`&#39;`
/// for the apostrophe, which both know; HTML 4 has no `&apos;`).
pub(crate) fn escape_into(text: &str, out: &mut String) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

/// [`escape_into`] a new string.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    escape_into(text, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_names_and_titles_stays_text() {
        assert_eq!(
            escape("<script>\"a\" & 'b'</script> ok"),
            "&lt;script&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/script&gt; ok"
        );
    }
}
