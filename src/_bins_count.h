/* The counting of src/_bins.c for one type T (float or double): included once per type, with
 * T, T_MAX (its largest finite number), UPPER and COUNT (the names of the two functions) defined. */

/* How many of the m sorted bounds b are <= x: numpy.searchsorted(b, x, side="right"). */
static Py_ssize_t UPPER(const T *b, Py_ssize_t m, T x) {
    Py_ssize_t lo = 0, hi = m;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (b[mid] <= x)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Adds the counts of the n values x to counts[0 .. bins); work holds CHUNK codes and
 * TABLES * (bins + 1) table entries (entry bins of a table: the values to bin exactly). */
static void COUNT(const T *x, Py_ssize_t n, T lo, T scale, T tol, const T *interior, Py_ssize_t bins,
                  int64_t *counts, int32_t *work) {
    int32_t *code = work, *table = work + CHUNK;
    const int32_t exact_code = (int32_t)bins, width = (int32_t)bins + 1;
    const T half = (T)0.5, top = (T)bins - (T)0.5, margin = 2 * tol;
    for (Py_ssize_t start = 0; start < n; start += CHUNK) {
        const Py_ssize_t m = n - start < CHUNK ? n - start : CHUNK;
        const T *xb = x + start;
        for (Py_ssize_t i = 0; i < m; i++) { /* branch-free: vectorised (see _bins.c) */
            T w = (xb[i] - lo) * scale;
            T c = w < half ? half : w;
            c = c > top ? top : c;
            c = c == c ? c : half; /* NaN (flagged below): a number to truncate */
            int32_t k = (int32_t)c, below = (int32_t)(c - margin), above = (int32_t)(c + margin);
            code[i] = (below != above) | !(w - w == 0) ? exact_code : k;
        }
        memset(table, 0, sizeof(int32_t) * TABLES * (size_t)width);
        Py_ssize_t i = 0;
        for (; i + TABLES <= m; i += TABLES) { /* TABLES == 4 */
            table[code[i]]++;
            table[width + code[i + 1]]++;
            table[2 * width + code[i + 2]]++;
            table[3 * width + code[i + 3]]++;
        }
        for (; i < m; i++) table[code[i]]++;
        int64_t exact = 0;
        for (int t = 0; t < TABLES; t++) exact += table[t * width + bins];
        for (i = 0; exact > 0 && i < m; i++) {
            if (code[i] != exact_code) continue;
            exact--;
            T v = xb[i];
            if (v != v || v > T_MAX || v < -T_MAX) continue; /* NaN, +-Inf: in no bin */
            /* Searched, whatever its position: one that overflows may lie inside the edges (a span
             * wider than T's largest number) or outside them (the search puts it in an outer bin). */
            table[UPPER(interior, bins - 1, v)]++;
        }
        for (Py_ssize_t b = 0; b < bins; b++)
            for (int t = 0; t < TABLES; t++) counts[b] += table[t * width + b];
    }
}

#undef T
#undef T_MAX
#undef UPPER
#undef COUNT
