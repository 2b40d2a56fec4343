# Sourced by the benchmarks that run in rounds. median_of "V1 V2 ..." prints the
# median of the space-separated numbers (the mean of the middle two for an even count).
median_of() {
    echo "$1" | tr ' ' '\n' | grep . | sort -g \
        | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
